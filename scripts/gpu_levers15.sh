#!/usr/bin/env bash
# Seventh session, third call, ONE H200, <= ~9.5 minutes (issue 16): the Triton attention after its first run
# (loads of a step issued together; the residual add before the norm no longer an addmm under compile), its settings,
# and the new CUDA defaults (lean-triton; compile-layer-triton for fast="compile") in chains.
#  1. 7B forward: math and Triton layouts, eager and compiled, and Triton settings (slot ranges, step, stages);
#  2. 13B forward: the same four layouts;
#  3. the gpu-marked tests (static path: graphs vs eager) and gpu_check.py (ar, sd, pipe: same tokens) on the
#     default layout, then gpu_check.py under compile-layer-triton;
#  4. {68m,7b} on one GPU, alpha 0.9, ar / sd:8 / pipe, 3 repeats: lean-math (the old default) vs the new default.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers15.sh. Results: $OUT/levers15.tgz (+ levers15.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers15
{
  echo "== forward 7b $(date +%T)"
  timeout 110 python3 scripts/gpu_forward.py "$W/fwd7" --shapes 7b --budget-s 100 --variants \
      compile-layer-triton,compile-layer-math,compile-layer-triton@SPLITS=4,compile-layer-triton@SPLITS=16+BLOCK=32,compile-layer-triton@STAGES=1,lean-math,lean-triton,lean-triton@SPLITS=2 \
      > "$W/fwd7.log" 2>&1; echo "fwd7 rc=$?"
  echo "== forward 13b $(date +%T)"
  timeout 75 python3 scripts/gpu_forward.py "$W/fwd13" --shapes 13b --budget-s 65 \
      --variants compile-layer-triton,compile-layer-math,lean-triton,lean-math > "$W/fwd13.log" 2>&1; echo "fwd13 rc=$?"
  echo "== gpu tests $(date +%T)"
  gpu_tests 60
  echo "== check default $(date +%T)"
  check_chain default 45
  echo "== check compile-layer-triton $(date +%T)"
  check_chain compiled 100 PIPESPEC_STATIC_VARIANT=compile-layer-triton
  for v in lean-math default; do
    echo "== chain $v $(date +%T)"
    if [ "$v" = default ]; then unset PIPESPEC_STATIC_VARIANT; else export PIPESPEC_STATIC_VARIANT=$v; fi
    timeout 95 python3 scripts/gpu_pipe_probe.py "$W/chain-$v" --chains "7b on GPU 0" --alphas 0.9 \
        --methods ar,sd:8,pipe --repeats 3 --budget-s 85 > "$W/chain-$v.log" 2>&1
    echo "chain $v rc=$?"; grep alpha "$W/chain-$v.log" | cut -c1-300
  done
  unset PIPESPEC_STATIC_VARIANT
  echo "== end $(date +%T)"
} > "$O/levers15.log" 2>&1
levers_end
grep -h "median_ms" "$W"/fwd*.log | cut -c1-200
