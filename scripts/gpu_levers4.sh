#!/usr/bin/env bash
# Fourth session's first call, ONE H200, <= ~9.5 minutes:
#  1. why a small stage runs at a big one's pace as threads on one GPU (scripts/gpu_share.py; issue 14);
#  2. the Qwen2.5 / Qwen3 / Mistral static forwards against HF's and the floor (gpu_forward.py; issue 16);
#  3. int4 weights: the GEMV table and the 70B / 7B forwards (gpu_quant.py; issue 16; never run on a GPU before).
# Results under $OUT: share.md/json, forward.md/json, quant.md/json, levers4.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers4}; mkdir -p "$O"
{
  echo "== share $(date +%T)"
  timeout 170 python3 scripts/gpu_share.py /tmp/share; echo "share rc=$?"
  cp /tmp/share/share.md /tmp/share/share.json "$O/" 2>/dev/null
  echo "== forward $(date +%T)"
  timeout 170 python3 scripts/gpu_forward.py /tmp/fwd --shapes qwen2.5-7b,qwen3-8b,mistral-7b \
      --variants lean-math,compile-layer-math --budget-s 140; echo "forward rc=$?"
  cp /tmp/fwd/gpu_forward.md "$O/forward.md"; cp /tmp/fwd/gpu_forward.json "$O/forward.json"
  echo "== int4 $(date +%T)"
  timeout 230 python3 scripts/gpu_quant.py /tmp/quant --gemv 7b.qkv/o,7b.gate,7b.down,70b.qkv,70b.gate_up,70b.down \
      --shapes 70b,7b --kernels triton --no-linear --variant compile-layer --budget 190; echo "quant rc=$?"
  cp /tmp/quant/*.md "$O/quant.md" 2>/dev/null; cp /tmp/quant/*.json "$O/quant.json" 2>/dev/null
  ls /tmp/quant
  echo "== end $(date +%T)"
} > "$O/levers4.log" 2>&1
grep -E "^==|rc=|error|Error" "$O/levers4.log" | cut -c1-300
