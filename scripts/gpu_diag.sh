#!/usr/bin/env bash
# One-off diagnosis of a CUDA fault in `pipespec bench` (HF's compiled generate beside our graphs in one process):
# which method set crashes. Two GPUs side by side; results under $OUT. Not part of the suite.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PIPESPEC_TRACEBACK=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/diag}; mkdir -p "$O"
B=(python3 -m pipespec bench --n 2 --max-new-tokens 32 --device cuda --dtype float32 --json --prompts code)
run() { local name=$1 gpu=$2; shift 2; ( env CUDA_VISIBLE_DEVICES=$gpu timeout 150 "${B[@]}" "$@" > /dev/null \
        2> "$O/$name.err"; echo "$name rc=$?" >> "$O/rc.txt" ) & }
run hf_auto 0 --methods hf,auto
run hf_ar_sd_pipe_auto 1 --methods hf,ar,sd,pipe,auto
wait
run five 0 --methods hf,hf_assisted,ar,sd,pipe
run ours_then_hf 1 --methods ar,sd,pipe,auto,hf
wait
cat "$O/rc.txt"; for f in "$O"/*.err; do echo "== $f"; grep -E "failed|Error|error" "$f" | grep -v "^frame\|Search for\|Compile with" | head -5 | cut -c1-200; done
