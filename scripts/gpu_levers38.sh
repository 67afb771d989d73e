#!/usr/bin/env bash
# ONE H200, ~4 minutes (the fourteenth session's second call): the Triton W8A16 GEMM (kernels/triton_wgemm.py) for
# a quantized forward past 16 rows (a prompt's prefill), against the routing before it (the GEMV once per 16 rows up
# to 64, then the torch path's bf16 copy of the weight per call):
#  1. scripts/gpu_quant_rows.py --compare gemm: the 70B (then 7B) in int8, whole forward, CUDA-graph replay, 1-512 rows;
#  2. tests/test_quant.py on the GPU (the GEMM in bf16 included).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers38.sh      Results: $OUT/levers38.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers38
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nvidia-smi -L
  timeout 230 python3 scripts/gpu_quant_rows.py "$W/rows" --compare gemm --shapes 70b,7b --budget-s 180 \
      --rows 1,16,17,32,64,65,128,256,512 > "$W/rows.log" 2>&1
  echo "rows rc=$?"; cut -c1-300 "$W/rows.log"
  echo "== tests $(date +%T)"
  timeout 150 python3 -m pytest -q tests/test_quant.py > "$W/pytest.log" 2>&1; echo "pytest rc=$?"; tail -4 "$W/pytest.log"
  echo "== end $(date +%T)"
} > "$O/levers38.log" 2>&1
levers_end
