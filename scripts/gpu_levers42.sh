#!/usr/bin/env bash
# ONE H200, ~9 minutes (the fifteenth session's second call, issue 14): the draft's time per token inside the pipeline
# with its fed tokens inside its own graph (this tree) against the tree before (54a8997, extracted into .ab/old54 and
# carried: `git archive 54a8997 pipespec scripts ':!pipespec/assets' | tar x -C .ab/old54`), on the same lease:
#  1. this tree: {68m,7b,13b} on one H200 at alpha 0.7 (the row the first call's budget did not reach) and {68m,7b},
#     256 tokens after 128, 3 warm repeats, ar, sd:4/8/16, pipe, auto; pipe traced;
#  2. the tree before: {68m,7b,13b} and {68m,7b} at 0.7, ar and pipe, pipe traced;
#  3. this tree with the interpreter's GIL switch interval at 100 us instead of 5 ms (gpu_pipe_probe.py
#     --switch-interval-us): the first call's trace of {68m,7b} put ~0.15-0.25 ms of each lock-step round between the
#     verdict's put and the draft thread's wake-up, while the event loop went on (commit, bookkeeping) holding the GIL;
#     both chains at 0.7, ar, sd:8, pipe, pipe traced;
#  4. each trace summarised (scripts/trace_draft_summary.py: the draft's block and free calls, ms per token).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers42.sh      Results: $OUT/levers42.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers42
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nvidia-smi -L
  echo "== this tree $(date +%T)"
  timeout 230 python3 scripts/gpu_pipe_probe.py "$W/new" --one-gpu --chains "13b on GPU 0,7b on GPU 0" --alphas 0.7 \
      --trace-alphas 0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto --tokens 256 --repeats 3 --budget-s 205 \
      > "$W/new.log" 2>&1
  echo "new rc=$?"; grep -E "alpha|FAILED|Error|warm" "$W/new.log" | cut -c1-800
  echo "== the tree before (54a8997) $(date +%T)"
  PIPESPEC_COMMIT=54a8997 PYTHONPATH=/tmp/site:$PWD/.ab/old54 timeout 140 python3 .ab/old54/scripts/gpu_pipe_probe.py \
      "$W/old" --one-gpu --chains "13b on GPU 0,7b on GPU 0" --alphas 0.7 --trace-alphas 0.7 --methods ar,pipe \
      --tokens 256 --repeats 3 --budget-s 120 > "$W/old.log" 2>&1
  echo "old rc=$?"; grep -E "alpha|FAILED|Error|warm" "$W/old.log" | cut -c1-800
  echo "== this tree, switch interval 100 us $(date +%T)"
  timeout 150 python3 scripts/gpu_pipe_probe.py "$W/gil" --one-gpu --chains "13b on GPU 0,7b on GPU 0" --alphas 0.7 \
      --trace-alphas 0.7 --methods ar,sd:8,pipe --tokens 256 --repeats 3 --budget-s 130 \
      --switch-interval-us 100 > "$W/gil.log" 2>&1
  echo "gil rc=$?"; grep -E "alpha|FAILED|Error|warm" "$W/gil.log" | cut -c1-800
  echo "== traces $(date +%T)"
  for f in "$W"/new/trace-*.json "$W"/old/trace-*.json "$W"/gil/trace-*.json; do
      python3 scripts/trace_draft_summary.py "$f" 2>&1 | head -40; done
  echo "== end $(date +%T)"
} > "$O/levers42.log" 2>&1
levers_end
