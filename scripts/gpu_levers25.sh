#!/usr/bin/env bash
# Ninth session, TWO H200s, <= ~9 minutes (issue 14): {1b,8b on GPU 0; 70b in 8 bits on GPU 1} after the change
# that keeps a quantized stage's verify windows within its GEMV's 16 rows (gpu_levers24.sh saw a first 63-token
# verify cost 215 ms and the adaptive runtime then keep the 70B's windows at 3-4 tokens), alpha 0.9 / 0.7 by default.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers25.sh [ALPHAS [BUDGET_S]]. Results: $OUT/levers25.tgz (+ .log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers25
{
  echo "== commit ${PIPESPEC_COMMIT:-?} $(date +%T)"
  timeout $((${2:-250} + 120)) python3 scripts/gpu_pipe_probe.py "$W/70b8" --chains "8b on GPU 0; 70b int8" \
      --alphas "${1:-0.9,0.7}" --tokens 256 --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s "${2:-250}" \
      > "$W/70b8.log" 2>&1
  echo "rc=$?"; grep -E "alpha|FAILED|warm|loaded" "$W/70b8.log" | cut -c1-700
  echo "== end $(date +%T)"
} > "$O/levers25.log" 2>&1
levers_end
