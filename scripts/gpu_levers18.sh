#!/usr/bin/env bash
# Seventh session, sixth call, ONE H200, <= ~5 minutes (issue 16): the forwards after the residual hand-over
# (a layer's MLP output added in the next layer's norm: no addmm copy under compile).
#  1. 7B and 13B: compile-layer-triton, lean-triton (and compile-layer-math at 7B);
#  2. the 70B shape in 8 and 4 bits on one H200, compile-layer-triton;
#  3. the gpu-marked tests and gpu_check.py (default layout, compile-layer-triton).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers18.sh. Results: $OUT/levers18.tgz (+ levers18.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers18
{
  echo "== forward 7b $(date +%T)"
  timeout 70 python3 scripts/gpu_forward.py "$W/fwd7" --shapes 7b --budget-s 60 \
      --variants compile-layer-triton,lean-triton,compile-layer-math > "$W/fwd7.log" 2>&1; echo "fwd7 rc=$?"
  echo "== forward 13b $(date +%T)"
  timeout 60 python3 scripts/gpu_forward.py "$W/fwd13" --shapes 13b --budget-s 50 \
      --variants compile-layer-triton,lean-triton > "$W/fwd13.log" 2>&1; echo "fwd13 rc=$?"
  echo "== quant 70b $(date +%T)"
  timeout 110 python3 scripts/gpu_quant.py "$W/quant" --shapes 70b --variant compile-layer-triton --kernels triton \
      --no-linear --budget 100 > "$W/quant.log" 2>&1; echo "quant rc=$?"
  echo "== gpu tests $(date +%T)"
  gpu_tests 50
  echo "== check default $(date +%T)"
  check_chain default 40
  echo "== check compile-layer-triton $(date +%T)"
  check_chain compiled 90 PIPESPEC_STATIC_VARIANT=compile-layer-triton
  echo "== end $(date +%T)"
} > "$O/levers18.log" 2>&1
levers_end
grep -h "median_ms" "$W"/fwd*.log | cut -c1-200
grep "70b" "$W/quant/gpu_quant.md" 2>/dev/null
