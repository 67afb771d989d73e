#!/usr/bin/env bash
# Sixth session, third call, TWO H200s, <= ~9 minutes: lock step from the first token (f14d42a, snapshot in
# .ab/cold) against the code before it (d7ecdd9, snapshot in .ab/before), side by side on one machine (carry .ab):
#  1. at once, one chain per GPU at a time: d7ecdd9 on GPU 0, f14d42a on GPU 1: {68m,7b}, {1b,8b}, {68m,7b,13b} on
#     one GPU at alpha 0.9/0.7 (sd:4, sd:8, sd:16, pipe; 5 repeats);
#  2. both GPUs, one tree after the other: {1b,8b on GPU 0; 70b tensor-parallel on 0+1} at alpha 0.9/0.7 (sd:4,
#     sd:8, pipe; 3 repeats).
# Usage: bash scripts/gpu_levers11.sh. Results: $OUT/levers11.tgz and levers11.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers11}; mkdir -p "$O"
W=/tmp/levers11; rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
tree() { echo "/tmp/site:$PWD/.ab/$1:$PWD"; }
{
  echo "== one gpu: before (GPU 0) | cold (GPU 1) $(date +%T)"
  PYTHONPATH=$(tree before) PIPESPEC_COMMIT=d7ecdd9 timeout 225 python3 scripts/gpu_pipe_probe.py "$W/one-before" \
      --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" --alphas 0.9,0.7 --methods sd:4,sd:8,sd:16,pipe --repeats 5 \
      --budget-s 165 > "$W/one-before.log" 2>&1 &
  B=$!
  PYTHONPATH=$(tree cold) PIPESPEC_COMMIT=f14d42a CUDA_VISIBLE_DEVICES=1 timeout 225 python3 \
      scripts/gpu_pipe_probe.py "$W/one-cold" --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" --alphas 0.9,0.7 \
      --methods sd:4,sd:8,sd:16,pipe --repeats 5 --budget-s 165 > "$W/one-cold.log" 2>&1
  echo "one-cold rc=$?"
  wait $B; echo "one-before rc=$?"
  grep alpha "$W/one-before.log" "$W/one-cold.log"
  for T in before cold; do
    L=$(left 575)
    echo "== 70b chain, $T $(date +%T), ${L} s"
    if [ "$L" -gt 110 ]; then
      C=d7ecdd9; [ $T = cold ] && C=f14d42a
      M=$(( L / 2 )); [ $T = cold ] && M=$L
      PYTHONPATH=$(tree $T) PIPESPEC_COMMIT=$C timeout $M python3 scripts/gpu_pipe_probe.py "$W/tp-$T" \
          --chains "8b on GPU 0; 70b" --alphas 0.9,0.7 --methods sd:4,sd:8,pipe --repeats 3 \
          --budget-s $(( M - 25 )) > "$W/tp-$T.log" 2>&1
      echo "tp-$T rc=$?"; grep alpha "$W/tp-$T.log"
    fi
  done
  echo "== end $(date +%T)"
} > "$O/levers11.log" 2>&1
tar czf "$O/levers11.tgz" -C "$W" . 2>/dev/null
grep -E "^==|rc=|alpha|Error" "$O/levers11.log" | cut -c1-300
