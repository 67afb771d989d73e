#!/usr/bin/env bash
# Eighth session, first call, ONE H200, <= ~7 minutes (issue 14): where does a lock-step round's time go on one GPU?
#  1. gpu_pipe_probe.py, {68m,7b} and {1b,8b} on GPU 0, alpha 0.9 and 0.7: ar, sd:8, sd:16, pipe (3 repeats); at 0.9
#     sd:8, sd:16 and pipe traced once each, with the GPU's idle gaps per hand-over (pipespec.tracing.gpu_gaps);
#  2. gpu_forward.py: the drafts' own forwards (68m, 1b) in lean-triton, lean-math and compile-layer-triton.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers20.sh. Results: $OUT/levers20.tgz (+ levers20.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers20
{
  echo "== probe $(date +%T)"
  timeout 320 python3 scripts/gpu_pipe_probe.py "$W/probe" --chains "7b on GPU 0,8b on GPU 0" --alphas 0.9,0.7 \
      --methods sd:8,sd:16,pipe --trace-methods sd:8,sd:16,pipe --repeats 3 --budget-s 280 > "$W/probe.log" 2>&1
  echo "probe rc=$?"
  cat "$W/probe/probe.md" 2>/dev/null | grep -v "^- stage\|^- event" | cut -c1-600
  echo "== forward $(date +%T)"
  timeout 100 python3 scripts/gpu_forward.py "$W/fwd" --shapes 68m,1b --budget-s 90 \
      --variants lean-triton,lean-math,compile-layer-triton > "$W/fwd.log" 2>&1; echo "fwd rc=$?"
  grep -h "median_ms" "$W/fwd.log" | cut -c1-160
  echo "== end $(date +%T)"
} > "$O/levers20.log" 2>&1
levers_end
