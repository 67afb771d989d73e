#!/usr/bin/env bash
# Ninth session, ONE H200, <= ~8 minutes (issue 14): the one-GPU goal rows at the goal's 256 tokens under lean-fused,
# and the lock-step hand-over change (a cheaper best_block, the verifier yielding to the woken draft) against the
# tree before it:
#  1. before (.ab/before, BEFORE_COMMIT's pipespec/): {68m,7b}, {1b,8b} at alpha 0.9 / 0.7: sd:8, sd:16, pipe;
#  2. after (this tree): {68m,7b}, {1b,8b}, {68m,7b,13b} at 0.9 / 0.7: ar, sd:4, sd:8, sd:16, pipe, auto;
#  3. gpu_check.py on this tree (ar / sd / pipe give the same tokens, greedy and sampled).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers27.sh BEFORE_COMMIT. Results: $OUT/levers27.tgz (+ .log).
set -u
BEFORE=$1
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers27
probe() {  # NAME PYTHONPATH-PREFIX COMMIT CHAINS METHODS LIMIT BUDGET
  PYTHONPATH=/tmp/site:$2$PWD PIPESPEC_COMMIT=$3 timeout "$6" python3 scripts/gpu_pipe_probe.py "$W/$1" --one-gpu \
      --chains "$4" --alphas 0.9,0.7 --methods "$5" --tokens 256 --repeats 3 --budget-s "$7" > "$W/$1.log" 2>&1
  echo "$1 rc=$?"; grep -E "alpha|FAILED" "$W/$1.log" | cut -c1-420
}
{
  echo "== before ($BEFORE) $(date +%T)"
  probe before "$PWD/.ab/before:" "$BEFORE" "7b on GPU 0,8b on GPU 0" sd:8,sd:16,pipe 150 95
  echo "== after ($PIPESPEC_COMMIT) $(date +%T)"
  probe after "" "$PIPESPEC_COMMIT" "7b on GPU 0,8b on GPU 0,13b on GPU 0" ar,sd:4,sd:8,sd:16,pipe,auto 300 215
  echo "== check $(date +%T)"; check_chain default 80
  echo "== end $(date +%T)"
} > "$O/levers27.log" 2>&1
levers_end
