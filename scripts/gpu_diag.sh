#!/usr/bin/env bash
# After the bench's HF default moved to a child process on CUDA: the GPU tests (GPU 0) and the 70B int8 forward
# under the compiled layout (GPU 1), side by side. Results under $OUT (few files). Not part of the suite.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/diag}; mkdir -p "$O"
( CUDA_VISIBLE_DEVICES=0 timeout 280 python3 -m pytest -m gpu tests/ -q -p no:cacheprovider -o addopts="" -rfEsxX \
    > "$O/gpu_tests.txt" 2>&1; echo "gpu_tests rc=$?" >> "$O/gpu_tests.txt" ) &
( CUDA_VISIBLE_DEVICES=1 timeout 200 python3 scripts/gpu_quant.py /tmp/q70 --shapes 70b --kernels triton \
    --no-linear --variant compile-layer --budget 150 > /tmp/q70.log 2>&1
  CUDA_VISIBLE_DEVICES=1 timeout 100 python3 scripts/gpu_quant.py /tmp/q7 --shapes 7b,13b --kernels triton \
    --no-linear --variant compile-layer-math --budget 80 > /tmp/q7.log 2>&1
  cat /tmp/q70/gpu_quant.md /tmp/q7/gpu_quant.md > "$O/quant.md" 2>&1 ) &
wait
tail -n 15 "$O/gpu_tests.txt"; cat "$O/quant.md" | grep -E "^\||Errors|^- " | cut -c1-200
