#!/usr/bin/env bash
# Seventh session, fourth call, ONE H200, <= ~7 minutes: after the third call's two failures (TF32 dots in the
# Triton attention for float32 models; FX's process-wide tracing flag under compile-layer-* in a chain):
#  1. the gpu-marked tests (static path: graphs vs eager; the kernel in bf16);
#  2. gpu_check.py (ar, sd, pipe: same tokens, greedy and sampled) on the default layout and on compile-layer-triton;
#  3. {68m,7b} and {1b,8b} on one GPU, alpha 0.9, ar / sd:8 / pipe, 3 repeats: lean-math vs the new default.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers16.sh. Results: $OUT/levers16.tgz (+ levers16.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers16}; mkdir -p "$O"
W=/tmp/levers16; rm -rf "$W"; mkdir -p "$W"
{
  echo "== gpu tests $(date +%T)"
  timeout 60 python3 -m pytest -q -m gpu tests/test_static.py tests/test_triton_attention.py > "$W/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -2 "$W/pytest.log"
  echo "== check default $(date +%T)"
  timeout 45 python3 scripts/gpu_check.py cuda:0,cuda:0,cuda:0 > "$W/check-default.log" 2>&1
  echo "check default rc=$?"; grep -E "workers|identical|ALL OK|MISMATCH|Error" "$W/check-default.log" | head -6
  echo "== check compile-layer-triton $(date +%T)"
  PIPESPEC_STATIC_VARIANT=compile-layer-triton timeout 120 python3 scripts/gpu_check.py cuda:0,cuda:0,cuda:0 \
      > "$W/check-compiled.log" 2>&1
  echo "check compiled rc=$?"; grep -E "identical|ALL OK|MISMATCH|Error" "$W/check-compiled.log" | head -6
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
cp "$O/levers16.log" "$W/"
tar czf "$O/levers16.tgz" -C "$W" . 2>/dev/null
cat "$O/levers16.log"
