#!/usr/bin/env bash
# Seventh session, seventh call, ONE H200, <= ~3 minutes (issue 16): can a cuBLAS setting beat the default GEMVs
# of a 7B forward (split-K with a separate reduce kernel for o_proj and down_proj)?
#  1. gpu_blas.py: each 7B/13B linear, 1 and 8 tokens, default / cuBLASLt preferred / full-precision bf16 reductions;
#  2. the 7B forward (compile-layer-triton, lean-triton) under each setting.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers19.sh. Results: $OUT/levers19.tgz (+ levers19.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers19
{
  echo "== blas $(date +%T)"
  timeout 60 python3 scripts/gpu_blas.py "$W/blas" > "$W/blas.log" 2>&1; echo "blas rc=$?"
  for b in default lt no-reduced; do
    echo "== forward 7b $b $(date +%T)"
    timeout 45 python3 scripts/gpu_forward.py "$W/fwd-$b" --shapes 7b --budget-s 40 --blas $b \
        --variants lean-triton,compile-layer-triton > "$W/fwd-$b.log" 2>&1; echo "fwd $b rc=$?"
    grep -h "median_ms" "$W/fwd-$b.log" | cut -c1-160
  done
  echo "== end $(date +%T)"
} > "$O/levers19.log" 2>&1
levers_end
cat "$W/blas/gpu_blas.md" 2>/dev/null
