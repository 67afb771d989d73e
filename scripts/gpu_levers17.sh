#!/usr/bin/env bash
# Seventh session, fifth call, ONE H200, <= ~4 minutes: {68m,7b} on one GPU at alpha 0.9 (sd:8, pipe; 5 repeats),
# lean-math (the old default) and the new default (lean-triton) alternated twice, because the fourth call's pipe
# medians differed by more than their spread from one call to the next.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers17.sh. Results: $OUT/levers17.tgz (+ levers17.log).
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers17
{
  for run in lean-math.1 default.1 lean-math.2 default.2; do
    v=${run%.*}
    echo "== $run $(date +%T)"
    if [ "$v" = default ]; then unset PIPESPEC_STATIC_VARIANT; else export PIPESPEC_STATIC_VARIANT=$v; fi
    timeout 55 python3 scripts/gpu_pipe_probe.py "$W/$run" --chains "7b on GPU 0" --alphas 0.9 \
        --methods sd:8,pipe --repeats 5 --budget-s 50 > "$W/$run.log" 2>&1
    echo "$run rc=$?"; grep alpha "$W/$run.log" | cut -c1-300
  done
  unset PIPESPEC_STATIC_VARIANT
  echo "== end $(date +%T)"
} > "$O/levers17.log" 2>&1
levers_end
