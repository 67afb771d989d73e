#!/usr/bin/env bash
# Fourth session's last call, TWO H200s, <= ~8 minutes:
#  1. at once: on GPU 0, mode auto's one-GPU rows of the 3-stage chain ({68m,7b,13b}, alpha 0.9 and 0.7) with pipe
#     probed until it settles (issue 14); on GPU 1, int4 weights: the GEMV table (old and new int4 kernels next to
#     int8/fp8) and the 7B / 70B forwards (issue 16);
#  2. then both GPUs: the 70B chain {1b,8b on GPU 0; 70b tensor-parallel on 0+1} at alpha 0.9 on threads, after the
#     read-back change (before: pipe 39.9, sd:8 93.8 tokens/s; issue 14).
# Results under $OUT: auto.md/json, quant.md/json, tp.md/json, levers4d.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers4d}; mkdir -p "$O"
T0=$(date +%s)
{
  echo "== auto (GPU 0) and int4 (GPU 1) $(date +%T)"
  timeout 230 python3 scripts/gpu_pipe_probe.py /tmp/auto --chains "13b on GPU 0" --alphas 0.9,0.7 \
      --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 150 > /tmp/auto.log 2>&1 &
  AUTO=$!
  CUDA_VISIBLE_DEVICES=1 timeout 240 python3 scripts/gpu_quant.py /tmp/quant \
      --gemv 7b.down,70b.down --shapes 70b,7b --kernels triton --no-linear \
      --variant compile-layer --budget 210 > /tmp/quant.log 2>&1
  echo "quant rc=$?"
  wait $AUTO; echo "auto rc=$?"
  tail -n 5 /tmp/auto.log; tail -n 5 /tmp/quant.log
  cp /tmp/auto/probe.md "$O/auto.md"; cp /tmp/auto/probe.json "$O/auto.json"
  cp /tmp/quant/gpu_quant.md "$O/quant.md"; cp /tmp/quant/gpu_quant.json "$O/quant.json"
  LEFT=$(( 450 - ($(date +%s) - T0) ))
  echo "== 70b chain $(date +%T), ${LEFT} s left"
  if [ "$LEFT" -gt 90 ]; then
    timeout $LEFT python3 scripts/gpu_pipe_probe.py /tmp/tp --chains "8b on GPU 0; 70b" --alphas 0.9 \
        --methods ar,sd:8,pipe --repeats 3 --budget-s $(( LEFT - 80 )); echo "tp rc=$?"
    cp /tmp/tp/probe.md "$O/tp.md"; cp /tmp/tp/probe.json "$O/tp.json"
  fi
  echo "== end $(date +%T)"
} > "$O/levers4d.log" 2>&1
grep -E "^==|rc=|Error" "$O/levers4d.log" | cut -c1-300
