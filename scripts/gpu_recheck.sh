#!/usr/bin/env bash
# What the last session changed after its GPU runs, re-run in one call on 2 GPUs (<= ~9 minutes):
#  1. the tensor-parallel chain through the CLI after its loading fixes (scripts/gpu_tp_chain.sh);
#  2. mode auto (with its lookahead tuning) on ONE GPU against ar, sd at every lookahead and pipe, three chains,
#     alpha 0.7 and 0.9 (gpu_pipe_probe.py, thread backend, medians of 3).
# Results under $OUT: tpchain.txt, probe1.md, probe1.json, recheck.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/recheck}; mkdir -p "$O"
{
  echo "== tp chain $(date +%T)"
  OUT=/tmp/tpchain timeout 250 bash scripts/gpu_tp_chain.sh 2>&1 | tee "$O/tpchain.txt"
  for f in /tmp/tpchain/*.err; do echo "-- $f"; tail -n 3 "$f"; done >> "$O/tpchain.txt" 2>/dev/null
  echo "== probe one GPU $(date +%T)"
  timeout 290 python3 scripts/gpu_pipe_probe.py /tmp/probe1 --one-gpu --alphas 0.7,0.9 \
      --methods ar,sd:2,sd:4,sd:8,sd:16,pipe,auto --repeats 3 --budget-s 200
  echo "probe rc=$?"
  cp /tmp/probe1/probe.md "$O/probe1.md"; cp /tmp/probe1/probe.json "$O/probe1.json"
  echo "== end $(date +%T)"
} > "$O/recheck.log" 2>&1
grep -E "^==|rc=|same as|alpha|FAILED" "$O/recheck.log" | cut -c1-300
