#!/usr/bin/env bash
# Seventh session, first call, ONE H200, <= ~9 minutes (issue 16's forwards):
#  1. where a 7B one-token forward spends its time beyond the weight floor: gpu_forward.py on lean-math and
#     compile-layer-math (graph replays, kernels per graph, GPU time per kernel name);
#  2. the 70B shape in 8 and 4 bits on one H200 under the math attention layout (the 70B rows so far ran
#     compile-layer, whose efficient-attention kernel the 7B measured at 34 us a layer): int8, fp8, int4 (Triton).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers13.sh. Results: $OUT/levers13.tgz (+ levers13.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers13
{
  echo "== forward 7b $(date +%T)"
  timeout 200 python3 scripts/gpu_forward.py "$W/fwd" --shapes 7b --variants lean-math,compile-layer-math \
      --budget-s 170 > "$W/fwd.log" 2>&1; echo "fwd rc=$?"
  echo "== quant 70b $(date +%T)"
  timeout 330 python3 scripts/gpu_quant.py "$W/quant" --shapes 70b --variant compile-layer-math --kernels triton \
      --no-linear --budget 300 > "$W/quant.log" 2>&1; echo "quant rc=$?"
  echo "== end $(date +%T)"
} > "$O/levers13.log" 2>&1
levers_end
tail -n 5 "$W/fwd.log" "$W/quant.log"
