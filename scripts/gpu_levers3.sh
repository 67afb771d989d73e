#!/usr/bin/env bash
# Third session's second GPU call (2 GPUs, <= ~9.5 minutes): (1) the tensor-parallel chain through the CLI after the
# teardown fix, and a chain with an int8 target (gpu_tp_chain.sh); (2) the 70B shape's TP=2 forward, uncompiled vs
# compiled layout (gpu_tp.py); (3) the int8 GEMV, v1 vs split-K (gpu_quant.py --gemv-only). Results under $OUT.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers3}; mkdir -p "$O"
{
  echo "== tp chain $(date +%T)"
  OUT=/tmp/tpchain RUN_S=60 timeout 200 bash scripts/gpu_tp_chain.sh
  for f in /tmp/tpchain/*.err; do echo "-- $f"; grep -v "^\s*$" "$f" | tail -n 4; done
  echo "== gpu_tp 70b $(date +%T)"
  timeout 230 python3 scripts/gpu_tp.py /tmp/tp --budget-s 200 --layouts lean-math,compile-layer-math --shapes 70b
  echo "gpu_tp rc=$?"
  echo "== gemv $(date +%T)"
  timeout 140 python3 scripts/gpu_quant.py /tmp/gemv --gemv-only --budget 120 \
      --gemv 70b.down,70b.qkv,70b.gate_up,7b.qkv/o,7b.gate,7b.down
  echo "gemv rc=$?"
  echo "== end $(date +%T)"
} > "$O/levers3.log" 2>&1
cp /tmp/tp/gpu_tp.md /tmp/tp/gpu_tp.json /tmp/gemv/gpu_quant.md /tmp/gemv/gpu_quant.json "$O/" 2>/dev/null
tar -czf "$O/tpchain.tgz" -C /tmp tpchain 2>/dev/null
grep -E "^==|rc=|same as|tok/s|ms" "$O/levers3.log" | cut -c1-240 | tail -n 60
