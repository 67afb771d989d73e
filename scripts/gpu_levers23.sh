#!/usr/bin/env bash
# Eighth session, ONE H200, <= ~5 minutes (issue 14): lean-fused as CUDA's default, checked where it is now used.
#  1. the gpu-marked tests of the static path and both Triton modules, under the default;
#  2. gpu_check.py under the default (ar / sd / pipe give the same tokens, greedy and sampled);
#  3. gpu_forward.py: base vs lean-fused on the Qwen2.5-7B and Mistral-7B shapes (biases, GQA; logits vs base);
#  4. gpu_pipe_probe.py on {68m,7b,13b} at alpha 0.9 / 0.7 (sd:4, sd:8, pipe) under lean-triton, then the default.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers23.sh. Results: $OUT/levers23.tgz (+ levers23.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers23
{
  echo "== tests $(date +%T)"
  timeout 150 python3 -m pytest -q -m gpu tests/test_static.py tests/test_triton_attention.py \
      tests/test_triton_elementwise.py > "$W/pytest.log" 2>&1; echo "pytest rc=$?"; tail -3 "$W/pytest.log"
  echo "== check $(date +%T)"
  check_chain default 100
  echo "== forward $(date +%T)"
  timeout 90 python3 scripts/gpu_forward.py "$W/fwd" --shapes qwen2.5-7b,mistral-7b --budget-s 80 \
      --variants base,lean-fused > "$W/fwd.log" 2>&1; echo "fwd rc=$?"
  grep -h "^## \|^| base\|^| lean" "$W/fwd/gpu_forward.md" | cut -c1-220
  for v in lean-triton default; do
    echo "== three stages $v $(date +%T)"
    if [ $v = default ]; then unset PIPESPEC_STATIC_VARIANT; else export PIPESPEC_STATIC_VARIANT=$v; fi
    timeout 130 python3 scripts/gpu_pipe_probe.py "$W/three-$v" --chains "13b on GPU 0" --alphas 0.9,0.7 \
        --methods sd:4,sd:8,pipe --repeats 3 --budget-s 110 > "$W/three-$v.log" 2>&1
    echo "$v rc=$?"; grep "alpha" "$W/three-$v.log" | cut -c1-300
  done
  unset PIPESPEC_STATIC_VARIANT
  echo "== end $(date +%T)"
} > "$O/levers23.log" 2>&1
levers_end
