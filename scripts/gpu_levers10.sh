#!/usr/bin/env bash
# Sixth session, second call, TWO H200s, <= ~8 minutes: lock step on every link that shares a GPU (branch
# middle-lock) against lock step on the draft's link only (f14d42a, snapshot in .ab/cold: carry .ab).
#  1. at once: {68m,7b,13b} on ONE GPU at alpha 0.9/0.7 (sd:4, sd:8, pipe): f14d42a on GPU 0, this tree on GPU 1;
#  2. both GPUs, this tree: {1b,8b on GPU 0; 70b tensor-parallel on 0+1} at alpha 0.9/0.7/0.8/0.6 (sd:4, sd:8,
#     pipe); f14d42a's figures for it are the first call's (gpu_levers9.sh tp, the same code).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers10.sh. Results: $OUT/levers10.tgz and levers10.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers10}; mkdir -p "$O"
W=/tmp/levers10; rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
{
  echo "== one gpu, 3 stages: cold (GPU 0) | middle (GPU 1) $(date +%T)"
  PYTHONPATH=/tmp/site:$PWD/.ab/cold:$PWD PIPESPEC_COMMIT=f14d42a timeout 230 python3 scripts/gpu_pipe_probe.py \
      "$W/three-cold" --chains "13b on GPU 0" --alphas 0.9,0.7 --methods sd:4,sd:8,pipe --repeats 3 \
      --budget-s 170 > "$W/three-cold.log" 2>&1 &
  COLD=$!
  CUDA_VISIBLE_DEVICES=1 timeout 230 python3 scripts/gpu_pipe_probe.py "$W/three-middle" --chains "13b on GPU 0" \
      --alphas 0.9,0.7 --methods sd:4,sd:8,pipe --repeats 3 --budget-s 170 > "$W/three-middle.log" 2>&1
  echo "three-middle rc=$?"
  wait $COLD; echo "three-cold rc=$?"
  tail -n 3 "$W/three-cold.log" "$W/three-middle.log"
  L=$(left 540)
  echo "== 70b chain, this tree $(date +%T), ${L} s"
  if [ "$L" -gt 120 ]; then
    timeout $L python3 scripts/gpu_pipe_probe.py "$W/tp" --chains "8b on GPU 0; 70b" --alphas 0.9,0.7,0.8,0.6 \
        --methods sd:4,sd:8,pipe --repeats 3 --budget-s $(( L - 70 )) > "$W/tp.log" 2>&1
    echo "tp rc=$?"; tail -n 6 "$W/tp.log"
  fi
  echo "== end $(date +%T)"
} > "$O/levers10.log" 2>&1
tar czf "$O/levers10.tgz" -C "$W" . 2>/dev/null
grep -E "^==|rc=|alpha|Error" "$O/levers10.log" | cut -c1-300
