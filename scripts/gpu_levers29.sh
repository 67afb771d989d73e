#!/usr/bin/env bash
# Ninth session, ONE H200, <= ~3 minutes (issue 14): a quantized forward's time against the tokens it feeds, before
# (the torch path past 16 rows) and after chunking the GEMV per 16 rows up to 64 (scripts/gpu_quant_rows.py: 70B and
# 7B in int8 under CUDA's default layout; 1, 16, 17, 32, 64, 128 rows); then the quantized chain tests on the GPU.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers29.sh. Results: $OUT/levers29.tgz (+ levers29.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers29
{
  echo "== commit ${PIPESPEC_COMMIT:-?} $(date +%T)"
  timeout 200 python3 scripts/gpu_quant_rows.py "$W/rows" --shapes 70b,7b --budget-s 150 > "$W/rows.log" 2>&1
  echo "rc=$?"; cat "$W/rows.log" | cut -c1-300
  echo "== tests $(date +%T)"
  timeout 100 python3 -m pytest -q tests/test_quant.py > "$W/pytest.log" 2>&1; echo "pytest rc=$?"; tail -2 "$W/pytest.log"
  echo "== end $(date +%T)"
} > "$O/levers29.log" 2>&1
levers_end
