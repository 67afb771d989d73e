#!/usr/bin/env bash
# ONE H200, ~3 minutes (the fifteenth session's fourth call, issue 14): lock step's first verify (a 128-token prompt
# and a block: 133-142 tokens, past the largest token bucket) as graphs of at most 128 tokens instead of one eager
# forward (21-56 ms for a 7B in the earlier calls' traces). The gpu-marked tests of the static path, then {68m,7b}
# at alpha 0.9 (ar, sd:16, pipe, auto; 256 tokens after 128; 3 warm repeats), pipe traced: its first verify's span.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers44.sh      Results: $OUT/levers44.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers44
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nvidia-smi -L
  timeout 50 python3 -m pytest -q -m gpu tests/test_static.py > "$W/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -3 "$W/pytest.log" | cut -c1-300
  timeout 150 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu --chains "7b on GPU 0" --alphas 0.9 \
      --trace-alphas 0.9 --methods ar,sd:16,pipe,auto --tokens 256 --repeats 3 --budget-s 130 > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error|warm" "$W/probe.log" | cut -c1-800
  grep -E "^\| " "$W/probe/probe.md" | cut -c1-300
  python3 - "$W"/probe/trace-*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    doc = json.load(open(path)); ev = doc["traceEvents"]
    names = {e["tid"]: e["args"]["name"] for e in ev if e.get("name") == "thread_name"}
    t0 = min(e["ts"] for e in ev if "ts" in e)
    spans = sorted((e for e in ev if e.get("ph") == "X" and e["name"] in ("verify", "decode", "prefill")), key=lambda e: e["ts"])
    print(path.split("/")[-1], " | ".join(f"{names[e['tid']][:12]} {e['name']} at {(e['ts'] - t0) / 1e3:.1f} ms: "
                                           f"{e['dur'] / 1e3:.1f} ms" for e in spans[:4]))
    free = [e for e in ev if e.get("ph") == "X" and e["name"] == "draft" and not e.get("args", {}).get("block")]
    print("free draft calls:", len(free))
PY
  echo "== end $(date +%T)"
} > "$O/levers44.log" 2>&1
levers_end
