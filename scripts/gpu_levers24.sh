#!/usr/bin/env bash
# Ninth session, TWO H200s, <= ~9.5 minutes (issue 14): the two-GPU goal chains under CUDA's default layout
# (lean-fused), with the protocol at the goal's length (256 tokens):
#  1. {68m,7b on GPU 0; 13b on GPU 1}, alpha 0.6 / 0.7 / 0.8 / 0.9: ar, sd:2/4/8, pipe, auto;
#  2. {1b,8b on GPU 0; 70b in 8 bits on GPU 1} (no stage shares the target's GPU), alpha 0.9 / 0.7.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers24.sh. Results: $OUT/levers24.tgz (+ levers24.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers24
{
  echo "== commit ${PIPESPEC_COMMIT:-?} $(date +%T)"; nvidia-smi --query-gpu=name,memory.used --format=csv,noheader
  echo "== 13b on GPU 1 $(date +%T)"
  timeout 270 python3 scripts/gpu_pipe_probe.py "$W/13b" --chains "13b on GPU 1" --alphas 0.6,0.7,0.8,0.9 \
      --tokens 256 --methods ar,sd:2,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 185 > "$W/13b.log" 2>&1
  echo "rc=$?"; grep -E "alpha|FAILED|warm|loaded" "$W/13b.log" | cut -c1-600
  echo "== 70b int8 on GPU 1 $(date +%T)"
  timeout 290 python3 scripts/gpu_pipe_probe.py "$W/70b8" --chains "8b on GPU 0; 70b int8" --alphas 0.9,0.7 \
      --tokens 256 --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 165 > "$W/70b8.log" 2>&1
  echo "rc=$?"; grep -E "alpha|FAILED|warm|loaded" "$W/70b8.log" | cut -c1-600
  echo "== end $(date +%T)"
} > "$O/levers24.log" 2>&1
levers_end
