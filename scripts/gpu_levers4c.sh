#!/usr/bin/env bash
# Fourth session's third call, TWO H200s, <= ~9 minutes: the workers' read-back through a pinned buffer and an event
# (pipespec/workers/readback.py) instead of .tolist(), which gpu_share.py found made a small stage wait for a big
# one's work on a shared GPU (issue 14):
#  1. the GPU tests of the read-back, the static worker and the device draft;
#  2. gpu_share.py: tolist vs HostReader, and green contexts on top of HostReader;
#  3. the one-GPU chains (thread backend) at alpha 0.7 and 0.9: ar, sd 4/8/16, pipe, auto (before: this session's
#     levers4b auto.md and benchmarks.md's third-session table);
#  4. the 2-GPU chain {68m,7b on GPU 0; 13b on GPU 1} at alpha 0.7 and 0.9 (before: levers4b sweep.md).
# Results under $OUT: tests.txt, share.md/json, onegpu.md/json, twogpu.md/json, levers4c.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers4c}; mkdir -p "$O"
T0=$(date +%s)
{
  echo "== tests $(date +%T)"
  timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_readback.py tests/test_static.py \
      tests/test_device_draft.py 2>&1 | tail -n 15 > "$O/tests.txt"; echo "tests rc=$?"; tail -n 2 "$O/tests.txt"
  echo "== share $(date +%T)"
  timeout 130 python3 scripts/gpu_share.py /tmp/share --seconds 1.5 --connections 8 --only "alone,tolist,HostReader"
  echo "share rc=$?"; cp /tmp/share/share.md /tmp/share/share.json "$O/" 2>/dev/null
  echo "== one gpu $(date +%T)"
  timeout 270 python3 scripts/gpu_pipe_probe.py /tmp/one --one-gpu --alphas 0.7,0.9 \
      --methods ar,sd:4,sd:8,sd:16,pipe,auto --repeats 3 --budget-s 190; echo "one rc=$?"
  cp /tmp/one/probe.md "$O/onegpu.md"; cp /tmp/one/probe.json "$O/onegpu.json"
  LEFT=$(( 530 - ($(date +%s) - T0) ))
  echo "== two gpus $(date +%T), ${LEFT} s left"
  if [ "$LEFT" -gt 60 ]; then
    timeout $LEFT python3 scripts/gpu_pipe_probe.py /tmp/two --chains "13b on GPU 1" --alphas 0.7,0.9 \
        --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s $(( LEFT - 50 )); echo "two rc=$?"
    cp /tmp/two/probe.md "$O/twogpu.md"; cp /tmp/two/probe.json "$O/twogpu.json"
  fi
  echo "== end $(date +%T)"
} > "$O/levers4c.log" 2>&1
grep -E "^==|rc=|passed|failed|Error" "$O/levers4c.log" | cut -c1-300
