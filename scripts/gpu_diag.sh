#!/usr/bin/env bash
# One-off diagnosis of a CUDA fault in `pipespec bench` (HF's compiled generate beside our graphs in one process,
# the default prompt set): which method set crashes, and whether a static cache grew first. Not part of the suite.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PIPESPEC_TRACEBACK=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/diag}; mkdir -p "$O"
B=(python3 -m pipespec bench --n 2 --max-new-tokens 32 --device cuda --dtype float32 --json)
run() { local name=$1 gpu=$2; shift 2; ( env CUDA_VISIBLE_DEVICES=$gpu timeout 150 "${B[@]}" "$@" > /dev/null \
        2> "$O/$name.err"; echo "$name rc=$?" >> "$O/rc.txt" ) & }
run hf_ar 0 --methods hf,ar
run ours_auto 1 --methods ar,sd,pipe,auto
wait
run five 0 --methods hf,hf_assisted,ar,sd,pipe
run hf_auto 1 --methods hf,auto
wait
cat "$O/rc.txt"; for f in "$O"/*.err; do echo "== $f"; grep -E "failed|grows|Error:" "$f" | grep -v "^frame\|Search for\|Compile with" | head -8 | cut -c1-200; done
