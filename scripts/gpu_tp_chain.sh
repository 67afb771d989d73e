#!/usr/bin/env bash
# A whole chain with a tensor-parallel target on two GPUs, through the CLI (issue 16): random-weight family of the
# bench shapes (float32, so greedy outputs can be compared exactly), the target unsplit vs split over GPUs 0+1, in
# ar / sd / pipe, thread and process backends. Prints one line per run (mode, placement, tokens/s, ids hash) and
# whether every run's ids equal the unsplit target's; then a chain with an int8 target (its ids against that int8
# target alone: losslessness is relative to the quantized target). Needs 2 GPUs. RUN_S: seconds per run (default 120).
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/tpchain}; mkdir -p "$O"
F=/tmp/tpfam
python3 scripts/make_random_family.py $F > "$O/family.txt" 2>&1
M="$F/draft,$F/middle,$F/target"
run() {  # NAME MODE PLACEMENT [extra args]
    local name=$1 mode=$2 place=$3; shift 3
    timeout ${RUN_S:-120} python3 -m pipespec run --models "$M" --device cuda --dtype float32 --placement "$place" \
        --mode "$mode" --prompt "def fibonacci(n):" --max-new-tokens 64 --no-tui --json "$@" > "$O/$name.json" \
        2> "$O/$name.err"
    echo "$name rc=$? $(date +%T)"
}
run ar_unsplit ar 0,0,0
run ar_tp ar 0,0,0+1
run pipe_tp pipe 0,0,0+1
run sd_tp sd 0,0,0+1
run pipe_tp_process pipe 0,0,0+1 --backend process
run ar_int8 ar 0,0,0 --quantize target=int8
run pipe_int8 pipe 0,0,0 --quantize target=int8
python3 - "$O" <<'PY'
import json, sys, pathlib
o = pathlib.Path(sys.argv[1]); ref = None
for name in ["ar_unsplit", "ar_tp", "pipe_tp", "sd_tp", "pipe_tp_process", "ar_int8", "pipe_int8"]:
    if name == "ar_int8":
        ref = None  # the int8 chain is compared with the int8 target alone
    try:
        d = json.loads((o / f"{name}.json").read_text())
    except Exception as e:
        print(name, "no result:", (o / f"{name}.err").read_text().strip().splitlines()[-1:] if (o / f"{name}.err").exists() else e); continue
    ids = d["token_ids"]; ref = ref or ids
    print(f"{name}: {d['stats']['tokens_per_second']:.1f} tok/s, same as ar_unsplit: {ids == ref}, "
          f"first difference: {next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), None)}")
PY
