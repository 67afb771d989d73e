#!/usr/bin/env bash
# ONE H200, ~8 minutes (issue 14), the fourteenth session's call:
#  1. gpu_check.py (the built-in family, 3 stages on cuda:0, greedy and sampled: ar, sd and pipe agree);
#  2. the one-GPU goal rows on this tree ({68m,7b}, {1b,8b}, {68m,7b,13b} at alpha 0.9 / 0.7; 256 tokens after 128;
#     3 warm repeats; ar, sd:4/8/16, pipe, auto), with the draft rejoining lock step after a bypass; pipe traced at
#     0.7 and summarised (scripts/trace_draft_summary.py);
#  3. a process's first long generation at 7B/13B shapes with capture ahead and without (scripts/
#     gpu_first_generation.py: fresh processes, warm-up as the CLI does, 512 tokens after 128).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers37.sh      Results: $OUT/levers37.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers37
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nproc; nvidia-smi -L
  echo "== check $(date +%T)"; check_chain default 90
  echo "== one GPU $(date +%T)"
  timeout 300 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" \
      --alphas 0.9,0.7 --trace-alphas 0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto --tokens 256 --repeats 3 \
      --budget-s 235 > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error" "$W/probe.log" | cut -c1-700
  echo "== traces $(date +%T)"
  python3 scripts/trace_draft_summary.py "$W"/probe/trace-*.json 2>&1 | head -120
  echo "== first generation $(date +%T)"
  timeout 150 python3 scripts/gpu_first_generation.py "$W/first" --chains "68m,7b" --modes ar,pipe --timeout-s 70 \
      > "$W/first-2.log" 2>&1; echo "first rc=$?"; tail -4 "$W/first-2.log" | cut -c1-600
  timeout 100 python3 scripts/gpu_first_generation.py "$W/first3" --chains "68m,7b,13b" --modes pipe --timeout-s 90 \
      > "$W/first-3.log" 2>&1; echo "first3 rc=$?"; tail -3 "$W/first-3.log" | cut -c1-600
  echo "== end $(date +%T)"
} > "$O/levers37.log" 2>&1
levers_end
