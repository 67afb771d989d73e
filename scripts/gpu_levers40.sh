#!/usr/bin/env bash
# ONE H200, ~1.5 minutes (the fourteenth session's fourth call): gpu_levers39's int8 check said MISMATCH under
# sampling. Is it the new GEMM? gpu_check.py with the target in int8 and a 40-token prompt, once with the GEMM from
# 17 rows (the default) and once without it (PIPESPEC_WGEMM_ROWS=off: the routing before), each printing which mode
# differs from ar and where. (Ran at 58a4a14 with this loop inline; results in docs/benchmarks.md.)
# Usage: bash scripts/gpu_levers40.sh      (prints to stdout)
set -u
source "$(dirname "$0")/gpu_env.sh"
for rows in 17- off; do
  echo "== PIPESPEC_WGEMM_ROWS=$rows"
  PIPESPEC_WGEMM_ROWS=$rows timeout 100 python3 scripts/gpu_check.py cuda:0,cuda:0,cuda:0 none,none,int8 2>&1 \
      | grep -vE "Loading weights"
done
