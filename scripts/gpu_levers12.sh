#!/usr/bin/env bash
# Sixth session, fourth call, TWO H200s, <= ~4 minutes: two trees side by side on the one-GPU chains, tree A on GPU 0,
# tree B on GPU 1, each process seeing only its GPU (gpu_levers11.sh's first part, whose tree on GPU 0 also matched
# the 70B chain by its label and ran out of memory): {68m,7b}, {1b,8b}, {68m,7b,13b} on one GPU at alpha 0.9/0.7
# (sd:4, sd:8, sd:16, pipe; 5 repeats).
# Usage: bash scripts/gpu_levers12.sh A:COMMIT B:COMMIT (A, B: snapshots in .ab/, carried). Results: $OUT/levers12.tgz.
set -u
A=${1%%:*}; CA=${1#*:}; B=${2%%:*}; CB=${2#*:}
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers12}; mkdir -p "$O"
W=/tmp/levers12; rm -rf "$W"; mkdir -p "$W"
one() {  # GPU TREE COMMIT
  PYTHONPATH=/tmp/site:$PWD/.ab/$2:$PWD PIPESPEC_COMMIT=$3 CUDA_VISIBLE_DEVICES=$1 timeout 230 python3 \
      scripts/gpu_pipe_probe.py "$W/one-$2" --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" --alphas 0.9,0.7 \
      --methods sd:4,sd:8,sd:16,pipe --repeats 5 --budget-s 170 > "$W/one-$2.log" 2>&1
  echo "one-$2 rc=$?"
}
{
  echo "== one gpu: $A (GPU 0) | $B (GPU 1) $(date +%T)"
  one 0 "$A" "$CA" &
  one 1 "$B" "$CB"
  wait
  grep alpha "$W/one-$A.log" "$W/one-$B.log"
  echo "== end $(date +%T)"
} > "$O/levers12.log" 2>&1
tar czf "$O/levers12.tgz" -C "$W" . 2>/dev/null
grep -E "^==|rc=|alpha|Error" "$O/levers12.log" | cut -c1-300
