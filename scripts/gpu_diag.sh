#!/usr/bin/env bash
# One-off diagnosis of a CUDA fault in `pipespec bench` (all methods in one process), two GPUs side by side.
# Results under $OUT: each run's stdout/stderr and exit code. Not part of the suite.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PIPESPEC_TRACEBACK=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/diag}; mkdir -p "$O"
B=(python3 -m pipespec bench --n 2 --max-new-tokens 32 --device cuda --dtype float32 --json)
run() { local name=$1 gpu=$2; shift 2; ( env CUDA_VISIBLE_DEVICES=$gpu "$@" > "$O/$name.out" 2> "$O/$name.err"; \
        echo "$name rc=$?" >> "$O/rc.txt" ) & }
run lean_blocking 0 CUDA_LAUNCH_BLOCKING=1 timeout 200 "${B[@]}"
run base 1 PIPESPEC_STATIC_VARIANT=base timeout 200 "${B[@]}"
wait
run ours_lean 0 timeout 150 "${B[@]}" --methods ar,sd,pipe,auto
run quant70 1 timeout 150 python3 scripts/gpu_quant.py "$O/quant70" --shapes 70b --kernels triton --no-linear \
    --variant compile-layer --budget 120
wait
timeout 120 python3 -m pytest -m gpu tests/test_static.py tests/test_synthetic.py -q -p no:cacheprovider \
    -o addopts="" > "$O/gpu_tests.txt" 2>&1; echo "gpu_tests rc=$?" >> "$O/rc.txt"
cat "$O/rc.txt"; tail -n 3 "$O"/*.err | cut -c1-300
