#!/usr/bin/env bash
# Ninth session, ONE H200, <= ~3 minutes (issue 14): the last row of the issue's table, {68m,7b} on one H200 with a
# 512-token prompt, alpha 0.9, 256 tokens: ar, sd:8, sd:16, pipe, auto (the issue measured pipe at 64 tokens/s there,
# 0.16x its best, at 275cc74).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers30.sh. Results: $OUT/levers30.tgz (+ levers30.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers30
{
  echo "== commit ${PIPESPEC_COMMIT:-?} $(date +%T)"
  timeout 200 python3 scripts/gpu_pipe_probe.py "$W/p512" --one-gpu --chains "7b on GPU 0" --alphas 0.9 \
      --prompt-len 512 --tokens 256 --methods ar,sd:8,sd:16,pipe,auto --repeats 3 --budget-s 140 > "$W/p512.log" 2>&1
  echo "rc=$?"; grep -E "alpha|FAILED|warm" "$W/p512.log" | cut -c1-600
  echo "== end $(date +%T)"
} > "$O/levers30.log" 2>&1
levers_end
