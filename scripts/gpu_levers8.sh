#!/usr/bin/env bash
# Fifth session's fifth call, TWO H200s, <= ~6.5 minutes: lock step inside the pipeline where the draft shares its GPU
# with the stage checking its tokens (ChainMonitor.lock_step; issue 14), on the chains of gpu_levers6.sh (the block
# rule alone; that script's second run, at e01e33e, did not engage lock step: the probe's fresh monitor per alpha
# dropped the placement, fixed by Pipeline.fresh_monitor):
#  1. at once: GPU 0 the 3-stage chain {68m,7b,13b} at alpha 0.9/0.7 (ar, sd 4/8, pipe, auto); GPU 1 the 2-stage
#     chains {68m,7b} and {1b,8b} at alpha 0.9/0.7 (ar, sd 4/8/16, pipe, auto);
#  2. both GPUs: {68m,7b on GPU 0; 13b on GPU 1} at alpha 0.7/0.9 (ar, sd:4, pipe, auto);
#  3. time permitting: {1b,8b on GPU 0; 70b tensor-parallel on 0+1} at alpha 0.9 (ar, sd:8, pipe).
# Results: $OUT/levers8.tgz (every probe.md/json and trace; the device returns at most 8 files) and levers8.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers8}; mkdir -p "$O"
W=/tmp/levers8; rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
{
  echo "== one gpu: 3 stages (GPU 0) | 2 stages (GPU 1) $(date +%T)"
  timeout 250 python3 scripts/gpu_pipe_probe.py "$W/three" --chains "13b on GPU 0" --alphas 0.9,0.7 \
      --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 180 > "$W/three.log" 2>&1 &
  THREE=$!
  CUDA_VISIBLE_DEVICES=1 timeout 250 python3 scripts/gpu_pipe_probe.py "$W/twostage" \
      --chains "7b on GPU 0,8b on GPU 0" --alphas 0.9,0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto --repeats 3 \
      --budget-s 180 > "$W/twostage.log" 2>&1
  echo "twostage rc=$?"
  wait $THREE; echo "three rc=$?"
  tail -n 3 "$W/three.log" "$W/twostage.log"
  L=$(left 250)
  echo "== two gpus $(date +%T), ${L} s"
  timeout $L python3 scripts/gpu_pipe_probe.py "$W/two" --chains "13b on GPU 1" --alphas 0.7,0.9 \
      --methods ar,sd:4,pipe,auto --repeats 3 --budget-s $(( L - 50 )) > "$W/two.log" 2>&1
  echo "two rc=$?"; tail -n 5 "$W/two.log"
  L=$(left 360)
  echo "== 70b chain $(date +%T), ${L} s"
  if [ "$L" -gt 100 ]; then
    timeout $L python3 scripts/gpu_pipe_probe.py "$W/tp" --chains "8b on GPU 0; 70b" --alphas 0.9 \
        --methods ar,sd:8,pipe --repeats 3 --budget-s $(( L - 80 )) > "$W/tp.log" 2>&1
    echo "tp rc=$?"; tail -n 3 "$W/tp.log"
  fi
  echo "== end $(date +%T)"
} > "$O/levers8.log" 2>&1
tar czf "$O/levers8.tgz" -C "$W" . 2>/dev/null
grep -E "^==|rc=|passed|failed|Error" "$O/levers8.log" | cut -c1-300
