#!/usr/bin/env bash
# Sixth session: lock step from the first token (f14d42a; issue 14). Before it, every generation began with the draft
# running free beside its verifier on the shared GPU, timing itself behind that verifier's forwards, so the blocks
# stayed 0 and the target decoded alone (the 70B chain: 16 of its first 16 steps). One call per PART, TWO H200s:
#   tp   {1b,8b on GPU 0; 70b tensor-parallel on 0+1} at ALPHAS (default 0.9,0.8,0.7,0.6): ar, sd:4, sd:8, pipe
#   one  at once: GPU 1 the 2-stage chains {68m,7b}, {1b,8b} at 0.9/0.7 (ar, sd:4/8/16, pipe, auto); GPU 0 the
#        3-stage chain {68m,7b,13b} at 0.9/0.7 (ar, sd:4/8, pipe); then {68m,7b on GPU 0; 13b on GPU 1} at 0.7/0.9
#        (ar, sd:4, pipe; 5 repeats)
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers9.sh PART [ALPHAS]
# Results: $OUT/levers9-PART.tgz (every probe.md/json and trace; the device returns at most 8 files) and the log.
set -u
PART=${1:?tp or one}; ALPHAS=${2:-0.9,0.8,0.7,0.6}
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers9}; mkdir -p "$O"
W=/tmp/levers9-$PART; rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
{
  if [ "$PART" = tp ]; then
    echo "== 70b chain $(date +%T) alphas $ALPHAS"
    timeout 540 python3 scripts/gpu_pipe_probe.py "$W/tp" --chains "8b on GPU 0; 70b" --alphas "$ALPHAS" \
        --methods ar,sd:4,sd:8,pipe --repeats 3 --budget-s 470 > "$W/tp.log" 2>&1
    echo "tp rc=$?"; tail -n 6 "$W/tp.log"
  else
    echo "== one gpu: 3 stages (GPU 0) | 2 stages (GPU 1) $(date +%T)"
    timeout 250 python3 scripts/gpu_pipe_probe.py "$W/three" --chains "13b on GPU 0" --alphas 0.9,0.7 \
        --methods ar,sd:4,sd:8,pipe --repeats 3 --budget-s 180 > "$W/three.log" 2>&1 &
    THREE=$!
    CUDA_VISIBLE_DEVICES=1 timeout 250 python3 scripts/gpu_pipe_probe.py "$W/twostage" \
        --chains "7b on GPU 0,8b on GPU 0" --alphas 0.9,0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto --repeats 3 \
        --budget-s 180 > "$W/twostage.log" 2>&1
    echo "twostage rc=$?"
    wait $THREE; echo "three rc=$?"
    tail -n 3 "$W/three.log" "$W/twostage.log"
    L=$(left 540)
    echo "== two gpus $(date +%T), ${L} s"
    if [ "$L" -gt 120 ]; then
      timeout $L python3 scripts/gpu_pipe_probe.py "$W/two" --chains "13b on GPU 1" --alphas 0.7,0.9 \
          --methods ar,sd:4,pipe --repeats 5 --budget-s $(( L - 60 )) > "$W/two.log" 2>&1
      echo "two rc=$?"; tail -n 5 "$W/two.log"
    fi
  fi
  echo "== end $(date +%T)"
} > "$O/levers9-$PART.log" 2>&1
tar czf "$O/levers9-$PART.tgz" -C "$W" . 2>/dev/null
grep -E "^==|rc=|alpha|Error" "$O/levers9-$PART.log" | cut -c1-300
