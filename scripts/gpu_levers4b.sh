#!/usr/bin/env bash
# Fourth session's second call, TWO H200s, <= ~9.5 minutes:
#  1. gpu_share.py on GPU 0 (why a small stage runs at a big one's pace as threads; streams, priorities, green
#     contexts, CUDA_DEVICE_MAX_CONNECTIONS; issue 14);
#  2. issue 14's protocol on {68m,7b on GPU 0; 13b on GPU 1} at alpha 0.6-0.9 (ar, sd 4/8/16, pipe, auto);
#  3. if time is left, mode auto's failing one-GPU row ({68m,7b,13b} on GPU 0, alpha 0.7) with steady-rate probes.
# Results under $OUT: share.md/json, sweep.md/json, auto.md/json, levers4b.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers4b}; mkdir -p "$O"
T0=$(date +%s)
{
  echo "== share $(date +%T)"
  timeout 200 python3 scripts/gpu_share.py /tmp/share --seconds 1.5; echo "share rc=$?"
  cp /tmp/share/share.md /tmp/share/share.json "$O/" 2>/dev/null
  echo "== sweep $(date +%T)"
  timeout 280 python3 scripts/gpu_pipe_probe.py /tmp/sweep --chains "13b on GPU 1" --alphas 0.6,0.7,0.8,0.9 \
      --methods ar,sd:4,sd:8,sd:16,pipe,auto --repeats 3 --budget-s 200; echo "sweep rc=$?"
  cp /tmp/sweep/probe.md "$O/sweep.md"; cp /tmp/sweep/probe.json "$O/sweep.json"
  LEFT=$(( 540 - ($(date +%s) - T0) ))
  echo "== auto $(date +%T), ${LEFT} s left"
  if [ "$LEFT" -gt 70 ]; then
    timeout $LEFT python3 scripts/gpu_pipe_probe.py /tmp/auto --chains "68m,7b,13b on GPU 0" --alphas 0.7 \
        --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s $(( LEFT - 60 )); echo "auto rc=$?"
    cp /tmp/auto/probe.md "$O/auto.md"; cp /tmp/auto/probe.json "$O/auto.json"
  fi
  echo "== end $(date +%T)"
} > "$O/levers4b.log" 2>&1
grep -E "^==|rc=|Error" "$O/levers4b.log" | cut -c1-300
