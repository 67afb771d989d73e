#!/usr/bin/env bash
# Fifth session's third call, TWO H200s, <= ~7 minutes (issue 14), {68m,7b on GPU 0; 13b on GPU 1}:
#  1. the block rule (HEAD) against the block rule plus a draft that ends its calls before the successor's verdict is
#     due (.ab/due, carried), alpha 0.7 and 0.9, sd:4 and pipe, 5 repeats each, alternating the two trees;
#  2. a trace of pipe at alpha 0.7 (HEAD);
#  3. {1b,8b on GPU 0; 70b tensor-parallel on 0+1}, alpha 0.9: sd:8, pipe, auto (does auto run lock step there?).
# Results: $OUT/levers7.tgz (probe.md/json and traces) and levers7.log.
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers7}; mkdir -p "$O"
W=/tmp/levers7; rm -rf "$W"; mkdir -p "$W"
T0=$(date +%s)
left() { echo $(( $1 - ($(date +%s) - T0) )); }
DUE_PATH=/tmp/site:$PWD/.ab/due:$PWD
HEAD_COMMIT=${PIPESPEC_COMMIT:-unknown}
{
  for v in head due; do
    echo "== $v $(date +%T)"
    if [ $v = due ]; then P=$DUE_PATH; C="$HEAD_COMMIT+due"; else P=$PYTHONPATH; C=$HEAD_COMMIT; fi
    PYTHONPATH=$P PIPESPEC_COMMIT=$C timeout 150 python3 scripts/gpu_pipe_probe.py "$W/$v" --chains "13b on GPU 1" \
        --alphas 0.7,0.9 --methods sd:4,pipe --repeats 5 --budget-s 110 > "$W/$v.log" 2>&1
    echo "$v rc=$?"; tail -n 3 "$W/$v.log"
  done
  echo "== trace at 0.7 $(date +%T)"
  timeout 90 python3 scripts/gpu_pipe_probe.py "$W/trace07" --chains "13b on GPU 1" --alphas 0.7 --methods pipe \
      --repeats 3 --budget-s 60 > "$W/trace07.log" 2>&1
  echo "trace07 rc=$?"; tail -n 2 "$W/trace07.log"
  L=$(left 420)
  echo "== 70b chain $(date +%T), ${L} s"
  if [ "$L" -gt 100 ]; then
    timeout $L python3 scripts/gpu_pipe_probe.py "$W/tp" --chains "8b on GPU 0; 70b" --alphas 0.9 \
        --methods sd:8,pipe,auto --repeats 3 --budget-s $(( L - 80 )) > "$W/tp.log" 2>&1
    echo "tp rc=$?"; tail -n 3 "$W/tp.log"
  fi
  echo "== end $(date +%T)"
} > "$O/levers7.log" 2>&1
tar czf "$O/levers7.tgz" -C "$W" . 2>/dev/null
grep -E "^==|rc=|passed|failed|Error" "$O/levers7.log" | cut -c1-300
