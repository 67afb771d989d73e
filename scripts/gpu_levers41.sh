#!/usr/bin/env bash
# ONE H200, ~9 minutes (the fifteenth session's call, issue 14):
#  1. the gpu-marked tests of the device draft and the static path (the fed tokens inside the draft's graph);
#  2. gpu_check.py (the built-in family, 3 stages on cuda:0, greedy and sampled: ar, sd and pipe agree);
#  3. the one-GPU goal rows ({68m,7b}, {1b,8b}, {68m,7b,13b} at alpha 0.9 / 0.7; 256 tokens after 128; 3 warm
#     repeats; ar, sd:4/8/16, pipe, auto) with the draft feeding what its cache lacks inside its own graph; pipe
#     traced at 0.7 and summarised; the GPU's clocks sampled every 200 ms through the rows (nvidia-smi), to see
#     whether a lease's slow draft comes with low clocks;
#  4. a process's first long generation (512 tokens after 128) with the warm-up's passes against one pass (the passes,
#     6f08c6e, were reverted after this call, and gpu_first_generation.py's --compare passes with them).
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers41.sh      Results: $OUT/levers41.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers41
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nproc; nvidia-smi -L
  echo "== gpu tests $(date +%T)"
  timeout 60 python3 -m pytest -q -m gpu tests/test_device_draft.py tests/test_static.py > "$W/pytest.log" 2>&1
  echo "pytest rc=$?"; tail -3 "$W/pytest.log" | cut -c1-400
  echo "== check $(date +%T)"; check_chain default 80
  echo "== one GPU $(date +%T)"
  nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,clocks_throttle_reasons.active \
      --format=csv,noheader -lms 200 > "$W/clocks.csv" 2>/dev/null &
  SMI=$!
  timeout 250 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" \
      --alphas 0.9,0.7 --trace-alphas 0.7 --methods ar,sd:4,sd:8,sd:16,pipe,auto --tokens 256 --repeats 3 \
      --budget-s 225 > "$W/probe.log" 2>&1
  echo "probe rc=$?"; kill $SMI 2>/dev/null
  grep -E "alpha|FAILED|Error" "$W/probe.log" | cut -c1-700
  python3 - "$W/clocks.csv" <<'PY'
import statistics, sys
rows = [l.split(", ") for l in open(sys.argv[1]) if l.count(",") >= 6]
def col(i):
    out = []
    for r in rows:
        try: out.append(float(r[i].split()[0]))
        except (ValueError, IndexError): pass
    return out
for name, i in (("sm MHz", 1), ("mem MHz", 2), ("power W", 3), ("temp C", 4), ("util %", 5)):
    v = col(i)
    if v: print(f"clocks {name}: n {len(v)} min {min(v)} median {statistics.median(v)} max {max(v)}")
reasons = {}
for r in rows: reasons[r[-1].strip()] = reasons.get(r[-1].strip(), 0) + 1
print("throttle reasons (samples):", dict(sorted(reasons.items(), key=lambda kv: -kv[1])[:6]))
PY
  echo "== traces $(date +%T)"
  python3 scripts/trace_draft_summary.py "$W"/probe/trace-*.json 2>&1 | head -120
  echo "== first generation $(date +%T)"
  timeout 85 python3 scripts/gpu_first_generation.py "$W/first" --compare passes --chains "68m,7b" --modes pipe \
      --timeout-s 40 > "$W/first-2.log" 2>&1; echo "first rc=$?"; tail -3 "$W/first-2.log" | cut -c1-600
  timeout 100 python3 scripts/gpu_first_generation.py "$W/first3" --compare passes --chains "68m,7b,13b" --modes pipe \
      --timeout-s 48 > "$W/first-3.log" 2>&1; echo "first3 rc=$?"; tail -3 "$W/first-3.log" | cut -c1-600
  echo "== end $(date +%T)"
} > "$O/levers41.log" 2>&1
levers_end
