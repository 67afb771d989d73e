#!/usr/bin/env bash
# ONE H200, ~5 minutes (the fifteenth session's third call, issue 14): the one-GPU rows at alpha 0.9 on this tree
# with full repeats ({68m,7b} and {68m,7b,13b}: the first call's budget left {68m,7b,13b} one repeat), each stage's
# in-pipeline time against its standalone forward at its own mean tokens per forward (the 7B's verifies at 0.9 are
# 9-17 tokens long, and the first call compared them with an 8-token forward: 1.23x), pipe traced at 0.9; first the
# gpu-marked tests of the static path and the device draft (a trace's GPU spans on the host clock among them).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers43.sh      Results: $OUT/levers43.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers43
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nvidia-smi -L
  timeout 60 python3 -m pytest -q -m gpu tests/test_static.py tests/test_device_draft.py > "$W/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -15 "$W/pytest.log" | cut -c1-300
  timeout 280 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu --chains "7b on GPU 0,13b on GPU 0" --alphas 0.9 \
      --trace-alphas 0.9 --methods ar,sd:4,sd:8,sd:16,pipe,auto --tokens 256 --repeats 3 --budget-s 250 \
      > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error|warm" "$W/probe.log" | cut -c1-800
  grep -E "^\| |^standalone|^## |^### " "$W/probe/probe.md" | cut -c1-300
  echo "== traces $(date +%T)"
  for f in "$W"/probe/trace-*.json; do python3 scripts/trace_draft_summary.py "$f" 2>&1 | head -45; done
  echo "== end $(date +%T)"
} > "$O/levers43.log" 2>&1
levers_end
