#!/usr/bin/env bash
# Seventh session, second call, ONE H200, <= ~9 minutes (issue 16's forwards): the Triton attention layouts
# (kernels/triton_attention.py) against the math ones.
#  1. 7B: lean-math, lean-triton with 1/2/4/8 slot ranges and the default choice, compile-layer-math,
#     compile-layer-triton (graph replays, kernels, GPU time per kernel name);
#  2. 13B: compile-layer-math, compile-layer-triton, lean-triton;
#  3. the 70B shape in 8 and 4 bits on one H200 under compile-layer-triton;
#  4. chains of the built-in family on CUDA with each Triton layout: the same tokens in ar, sd and pipe.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers14.sh. Results: $OUT/levers14.tgz (+ levers14.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers14
{
  echo "== forward 7b $(date +%T)"
  timeout 200 python3 scripts/gpu_forward.py "$W/fwd7" --shapes 7b --budget-s 180 --variants \
      lean-math,lean-triton@SPLITS=1,lean-triton@SPLITS=2,lean-triton@SPLITS=4,lean-triton@SPLITS=8,lean-triton,compile-layer-math,compile-layer-triton \
      > "$W/fwd7.log" 2>&1; echo "fwd7 rc=$?"
  echo "== forward 13b $(date +%T)"
  timeout 130 python3 scripts/gpu_forward.py "$W/fwd13" --shapes 13b --budget-s 115 \
      --variants lean-triton,compile-layer-math,compile-layer-triton > "$W/fwd13.log" 2>&1; echo "fwd13 rc=$?"
  echo "== quant 70b $(date +%T)"
  timeout 150 python3 scripts/gpu_quant.py "$W/quant" --shapes 70b --variant compile-layer-triton --kernels triton \
      --no-linear --budget 140 > "$W/quant.log" 2>&1; echo "quant rc=$?"
  for v in lean-triton compile-layer-triton; do
    echo "== check $v $(date +%T)"
    check_chain "$v" 70 PIPESPEC_STATIC_VARIANT="$v"
  done
  echo "== end $(date +%T)"
} > "$O/levers14.log" 2>&1
levers_end
grep -h "median_ms" "$W"/fwd*.log | cut -c1-240
cat "$W/quant/gpu_quant.md" 2>/dev/null | grep "70b"
