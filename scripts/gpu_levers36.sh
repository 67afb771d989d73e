#!/usr/bin/env bash
# For the next session, ONE H200, ~5 minutes (issue 14): why the 68M draft takes 1.68x its standalone forward inside
# the pipeline in {68m,7b,13b} at alpha 0.7 (1.0x at 0.9), and mode auto on the two-stage rows of this tree.
#  1. gpu_check.py (the built-in family, 3 stages on cuda:0, greedy and sampled);
#  2. one GPU, 256 tokens after 128, 3 warm repeats: {68m,7b} and {68m,7b,13b} at alpha 0.7 / 0.9, ar, sd:4/8/16,
#     pipe, auto; traces of pipe at both alphas, each summarised by scripts/trace_draft_summary.py (the draft's
#     block and free calls: tokens per call, ms per token; its waits; the target's verifies and lone decodes).
# One hypothesis to confirm or refute: at 0.7 the blocks are short, so a call's fixed cost (the first forward that
# feeds what the cache lacks, the read-back) is spread over fewer tokens; or blocks of 0 leave the draft drafting
# free beside the 13B's forwards, where its calls wait behind them on the GPU.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers36.sh      Results: $OUT/levers36.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers36
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nproc; nvidia-smi -L
  echo "== check $(date +%T)"; check_chain default 90
  echo "== one GPU $(date +%T)"
  timeout 300 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu --chains "7b on GPU 0,13b on GPU 0" \
      --alphas 0.9,0.7 --trace-alphas 0.9,0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto --tokens 256 --repeats 3 \
      --budget-s 220 > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error" "$W/probe.log" | cut -c1-700
  echo "== traces $(date +%T)"
  python3 scripts/trace_draft_summary.py "$W"/probe/trace-*.json 2>&1 | head -150
  echo "== end $(date +%T)"
} > "$O/levers36.log" 2>&1
levers_end
