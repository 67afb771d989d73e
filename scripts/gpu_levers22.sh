#!/usr/bin/env bash
# Eighth session, ONE H200 (issue 14): the element-wise work in three Triton kernels (lean-fused) against the default
# (lean-triton).
#   part "forward" (<= ~6 min): gpu_forward.py on 68m, 1b, 7b, 8b, 13b (lean-triton, lean-fused); the gpu-marked tests
#     of the static path and both Triton modules; gpu_check.py under lean-fused (ar / sd / pipe: the same tokens);
#   part "chains" (<= ~5 min): gpu_pipe_probe.py on {68m,7b} and {1b,8b} at alpha 0.9 and 0.7 (ar, sd:8, sd:16,
#     pipe; 3 repeats) under each layout, one after the other.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers22.sh forward|chains. Results: $OUT/levers22-PART.tgz (+ .log).
set -u
PART=$1
source "$(dirname "$0")/gpu_env.sh"
levers_begin "levers22-$PART"
{
  if [ "$PART" = forward ]; then
    echo "== forward $(date +%T)"
    timeout 260 python3 scripts/gpu_forward.py "$W/fwd" --shapes 68m,1b,7b,8b,13b --budget-s 240 \
        --variants lean-triton,lean-fused > "$W/fwd.log" 2>&1; echo "fwd rc=$?"
    grep -h "median_ms" "$W/fwd.log" | cut -c1-140
    grep -h "^## \|^| lean" "$W/fwd/gpu_forward.md" | cut -c1-200
    echo "== tests $(date +%T)"
    timeout 150 python3 -m pytest -q -m gpu tests/test_static.py tests/test_triton_attention.py \
        tests/test_triton_elementwise.py > "$W/pytest.log" 2>&1; echo "pytest rc=$?"; tail -3 "$W/pytest.log"
    echo "== check $(date +%T)"
    check_chain fused 100 PIPESPEC_STATIC_VARIANT=lean-fused
  else
    echo "== tests $(date +%T)"
    timeout 60 python3 -m pytest -q -m gpu tests/test_triton_elementwise.py > "$W/pytest.log" 2>&1
    echo "pytest rc=$?"; tail -3 "$W/pytest.log"
    for v in lean-triton lean-fused; do
      echo "== chains $v $(date +%T)"
      PIPESPEC_STATIC_VARIANT=$v timeout 150 python3 scripts/gpu_pipe_probe.py "$W/$v" \
          --chains "7b on GPU 0,8b on GPU 0" --alphas 0.9,0.7 --methods sd:8,sd:16,pipe --repeats 3 \
          --budget-s 130 > "$W/$v.log" 2>&1
      echo "$v rc=$?"; grep "alpha\|standalone" "$W/$v.log" "$W/$v/probe.md" | cut -c1-300
    done
  fi
  echo "== end $(date +%T)"
} > "$O/levers22-$PART.log" 2>&1
levers_end
