#!/usr/bin/env bash
# Ninth session, ONE H200, <= ~8 minutes (issue 14): a 70B target on one H200 in 8 bits with its drafts beside it,
# {1b,8b,70b int8 on GPU 0}, alpha 0.9 / 0.7, after the change that keeps a quantized stage's verify windows within
# its GEMV's 16 rows (the report's max_window per stage says what each worker declared: 15 for the int8 70B).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers26.sh. Results: $OUT/levers26.tgz (+ levers26.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers26
{
  echo "== commit ${PIPESPEC_COMMIT:-?} $(date +%T)"
  timeout 470 python3 scripts/gpu_pipe_probe.py "$W/one" --chains "70b int8 on GPU 0" --alphas 0.9,0.7 \
      --tokens 256 --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 330 > "$W/one.log" 2>&1
  echo "rc=$?"; grep -E "alpha|FAILED|warm|loaded" "$W/one.log" | cut -c1-700
  python3 -c "import json; print('max_window', [c.get('max_window') for c in json.load(open('$W/one/probe.json'))['chains']])"
  echo "== end $(date +%T)"
} > "$O/levers26.log" 2>&1
levers_end
