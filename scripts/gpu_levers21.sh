#!/usr/bin/env bash
# Eighth session, second call, ONE H200, <= ~7 minutes (issue 14): the lean lock-step hand-over (44c26c0: a doorbell
# on a loop future, a send without a checkpoint) against the tree before it, one after the other on the one GPU:
# {68m,7b}, {1b,8b}, {68m,7b,13b} at alpha 0.9 / 0.7 (sd:8, sd:16, pipe; 3 repeats; sd:16 and pipe traced at 0.9),
# then gpu_check.py on the new tree (ar / sd / pipe give the same tokens, greedy and sampled).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers21.sh BEFORE_COMMIT [reverse] (.ab/before: that commit's
# pipespec/, carried; reverse: the new tree first, so drift over the call does not favour one side; no check).
# Results: $OUT/levers21.tgz (+ levers21.log).
set -u
BEFORE=$1; ORDER=${2:-}
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers21
probe() {  # NAME PYTHONPATH-PREFIX COMMIT
  PYTHONPATH=/tmp/site:$2$PWD PIPESPEC_COMMIT=$3 timeout 200 python3 scripts/gpu_pipe_probe.py "$W/$1" \
      --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" --alphas 0.9,0.7 --methods sd:8,sd:16,pipe \
      --trace-methods sd:16,pipe --repeats 3 --budget-s 170 > "$W/$1.log" 2>&1
  echo "$1 rc=$?"; grep "alpha" "$W/$1.log" | cut -c1-300
}
{
  if [ "$ORDER" = reverse ]; then
    echo "== after ($PIPESPEC_COMMIT) $(date +%T)"; probe after "" "$PIPESPEC_COMMIT"
    echo "== before ($BEFORE) $(date +%T)"; probe before "$PWD/.ab/before:" "$BEFORE"
  else
    echo "== before ($BEFORE) $(date +%T)"; probe before "$PWD/.ab/before:" "$BEFORE"
    echo "== after ($PIPESPEC_COMMIT) $(date +%T)"; probe after "" "$PIPESPEC_COMMIT"
  fi
  grep -h "GPU of" "$W/before/probe.md" "$W/after/probe.md" | cut -c1-400
  if [ "$ORDER" != reverse ]; then echo "== check $(date +%T)"; check_chain default 90; fi
  echo "== end $(date +%T)"
} > "$O/levers21.log" 2>&1
levers_end
