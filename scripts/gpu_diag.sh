#!/usr/bin/env bash
# After CUDA's default layout became lean-math: the GPU tests of the static path and the synthetic workers, greedy
# identical across modes on 1 GPU (gpu_check), and the 2-GPU chain at alpha 0.7 / 0.9. Not part of the suite.
set -u
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
O=${OUT:-/tmp/diag}; mkdir -p "$O"
( timeout 100 python3 -m pytest -m gpu tests/test_static.py tests/test_synthetic.py -q -p no:cacheprovider \
    -o addopts="" > "$O/checks.txt" 2>&1; echo "gpu tests rc=$?" >> "$O/checks.txt"
  timeout 80 python3 scripts/gpu_check.py cuda:0,cuda:0,cuda:0 >> "$O/checks.txt" 2>&1
  echo "gpu_check rc=$?" >> "$O/checks.txt" )
timeout 120 python3 scripts/gpu_pipe_probe.py /tmp/p2 --chains "13b on GPU 1" --alphas 0.7,0.9 \
    --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 95 > /tmp/p2.log 2>&1
cp /tmp/p2/probe.md "$O/probe2.md" 2>/dev/null
tail -n 12 "$O/checks.txt"; grep "alpha" /tmp/p2.log | cut -c1-250
