#!/usr/bin/env bash
# Seventh session, fourth call, ONE H200, <= ~7 minutes: after the third call's two failures (TF32 dots in the
# Triton attention for float32 models; FX's process-wide tracing flag under compile-layer-* in a chain):
#  1. the gpu-marked tests (static path: graphs vs eager; the kernel in bf16);
#  2. gpu_check.py (ar, sd, pipe: same tokens, greedy and sampled) on the default layout and on compile-layer-triton;
#  3. {68m,7b} and {1b,8b} on one GPU, alpha 0.9, ar / sd:8 / pipe, 3 repeats: lean-math vs the new default.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers16.sh. Results: $OUT/levers16.tgz (+ levers16.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers16
{
  echo "== gpu tests $(date +%T)"
  gpu_tests 60
  echo "== check default $(date +%T)"
  check_chain default 45
  echo "== check compile-layer-triton $(date +%T)"
  check_chain compiled 120 PIPESPEC_STATIC_VARIANT=compile-layer-triton
  for v in lean-math default; do
    echo "== chains $v $(date +%T)"
    if [ "$v" = default ]; then unset PIPESPEC_STATIC_VARIANT; else export PIPESPEC_STATIC_VARIANT=$v; fi
    timeout 110 python3 scripts/gpu_pipe_probe.py "$W/chain-$v" --chains "7b on GPU 0,8b on GPU 0" --alphas 0.9 \
        --methods ar,sd:8,pipe --repeats 3 --budget-s 100 > "$W/chain-$v.log" 2>&1
    echo "chains $v rc=$?"; grep alpha "$W/chain-$v.log" | cut -c1-300
  done
  unset PIPESPEC_STATIC_VARIANT
  echo "== end $(date +%T)"
} > "$O/levers16.log" 2>&1
levers_end
