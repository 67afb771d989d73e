#!/usr/bin/env bash
# Twelfth session, ONE H200, ~6 minutes (issue 14): a process's one generation on a GPU with and without
# Pipeline.warm_up (a short unpublished generation first, so the real one replays CUDA graphs), each run a fresh
# process (scripts/gpu_warm_up.py), alternating without / with:
#  1. the built-in family on cuda:0, 256 tokens: ar, sd, pipe, 2 runs each way;
#  2. {68m,7b} synthetic (alpha 0.9, prompt 128), 256 tokens: ar and sd, 1 run each way;
#  3. `pipespec run --json` on the built-in family in a fresh cache folder: first (probes), second (remembered, with
#     the warm-up now), --mode pipe.
# SHORT=1: 68m,7b (a cold ar, then ar / sd / pipe with the warm-up) and the family with the warm-up.
# Usage: PIPESPEC_COMMIT=<sha> [SHORT=1] bash scripts/gpu_levers34.sh      Results: $OUT/levers34.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers34
one() {  # CHAIN MODE [--warm-up]
  timeout 120 python3 scripts/gpu_warm_up.py --chain "$1" --mode "$2" --tokens 256 ${3:-} 2>> "$W/warm.err" \
      | tail -1 | tee -a "$W/warm.jsonl"
}
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nproc; nvidia-smi -L
  if [ "${SHORT:-0}" = 1 ]; then  # after the spans change: with the warm-up only, and one cold ar baseline
    echo "== 68m,7b $(date +%T)"
    one 68m,7b ar; for mode in ar sd pipe; do one 68m,7b $mode --warm-up; done
    echo "== family $(date +%T)"
    for mode in ar sd pipe; do one family $mode --warm-up; done
  else
    echo "== family $(date +%T)"
    for i in 1 2; do for mode in ar sd pipe; do one family $mode; one family $mode --warm-up; done; done
    echo "== 68m,7b $(date +%T)"
    for mode in ar sd; do one 68m,7b $mode; one 68m,7b $mode --warm-up; done
    echo "== cli $(date +%T)"
    runcli first; runcli second; runcli pipe --mode pipe
  fi
  echo "== end $(date +%T)"
} > "$O/levers34.log" 2>&1
levers_end
