#!/usr/bin/env bash
# ONE H200, ~6 minutes (the fourteenth session's third call), after gpu_levers37/38:
#  1. gpu_check.py: the built-in family on cuda:0, and again with the target in int8 and a 40-token prompt (its
#     forwards past 16 rows run the Triton GEMM, now auto's choice from 17 rows): ar, sd and pipe agree;
#  2. the gpu tests of the static path and the quantized linears (the GEMM in bf16);
#  3. a process's first long generation again (scripts/gpu_first_generation.py), now that reset also captures the
#     token buckets a verifier has not met yet (workers.static.ladder; reverted after this call: on this cold
#     machine its captures made the {68m,7b} pipe first generation slower, docs/benchmarks.md).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers39.sh      Results: $OUT/levers39.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers39
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nvidia-smi -L
  echo "== check $(date +%T)"; check_chain default 90
  timeout 120 python3 scripts/gpu_check.py cuda:0,cuda:0,cuda:0 none,none,int8 > "$W/check-int8.log" 2>&1
  echo "check int8 rc=$?"; grep -E "identical|ALL OK|MISMATCH|Error" "$W/check-int8.log" | head -6
  echo "== gpu tests $(date +%T)"
  timeout 150 python3 -m pytest -q -m gpu tests/test_static.py tests/test_quant.py > "$W/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -2 "$W/pytest.log"
  echo "== first generation $(date +%T)"
  timeout 150 python3 scripts/gpu_first_generation.py "$W/first" --chains "68m,7b" --modes ar,pipe --timeout-s 70 \
      > "$W/first-2.log" 2>&1; echo "first rc=$?"; tail -4 "$W/first-2.log" | cut -c1-600
  timeout 100 python3 scripts/gpu_first_generation.py "$W/first3" --chains "68m,7b,13b" --modes pipe --timeout-s 90 \
      > "$W/first-3.log" 2>&1; echo "first3 rc=$?"; tail -3 "$W/first-3.log" | cut -c1-600
  echo "== end $(date +%T)"
} > "$O/levers39.log" 2>&1
levers_end
