#!/usr/bin/env bash
# Twelfth session, ONE H200, ~8 minutes (issue 14): the one-GPU goal rows on this tree (every stage but the target on
# its thread), and `pipespec run`'s new default (mode auto, its choice remembered across commands).
#  1. gpu_check.py (the built-in family, 3 stages on cuda:0: ar / sd / pipe give the same tokens, greedy and sampled);
#  2. one GPU, 256 tokens after 128, 3 warm repeats: {68m,7b}, {1b,8b}, {68m,7b,13b} at alpha 0.9 / 0.7, every method
#     (ar, sd:4/8/16, pipe, auto), outputs checked against ar, in-pipeline ms per forward against standalone;
#  3. `pipespec run` (the built-in family on cuda:0, --json) three times in a fresh cache folder: the first probes,
#     the second runs the remembered choice, the third --mode pipe; each command's wall time and stats.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers33.sh      Results: $OUT/levers33.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers33
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nproc; nvidia-smi -L
  echo "== check $(date +%T)"; check_chain default 90
  echo "== one GPU $(date +%T)"
  timeout 320 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu \
      --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" --alphas 0.9,0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto \
      --tokens 256 --repeats 3 --budget-s 235 > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error" "$W/probe.log" | cut -c1-600
  echo "== cli $(date +%T)"
  runcli first; runcli second; runcli pipe --mode pipe
  echo "== end $(date +%T)"
} > "$O/levers33.log" 2>&1
levers_end
