#!/usr/bin/env bash
# Ninth session, ONE H200, <= ~3 minutes (issue 14): gpu_levers27.sh's A/B again for the row that moved, in the
# reverse order (this tree first) and with 5 repeats: {68m,7b} on one GPU at alpha 0.9 / 0.7, sd:8, sd:16, pipe.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers28.sh BEFORE_COMMIT (.ab/before: that commit's pipespec/).
# Results: $OUT/levers28.tgz (+ levers28.log).
set -u
BEFORE=$1
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers28
probe() {  # NAME PYTHONPATH-PREFIX COMMIT
  PYTHONPATH=/tmp/site:$2$PWD PIPESPEC_COMMIT=$3 timeout 110 python3 scripts/gpu_pipe_probe.py "$W/$1" --one-gpu \
      --chains "7b on GPU 0" --alphas 0.9,0.7 --methods sd:8,sd:16,pipe --tokens 256 --repeats 5 --budget-s 75 \
      > "$W/$1.log" 2>&1
  echo "$1 rc=$?"; grep -E "alpha|FAILED" "$W/$1.log" | cut -c1-420
}
{
  echo "== after ($PIPESPEC_COMMIT) $(date +%T)"; probe after "" "$PIPESPEC_COMMIT"
  echo "== before ($BEFORE) $(date +%T)"; probe before "$PWD/.ab/before:" "$BEFORE"
  echo "== end $(date +%T)"
} > "$O/levers28.log" 2>&1
levers_end
