#!/usr/bin/env bash
# Fifth session's call, TWO H200s, <= ~9 minutes:
#  0. the gpu-marked read-back and verify tests (the rejection rule decided on the device, on CUDA);
#  1. at once: on GPU 0, mode auto's one-GPU rows of the 3-stage chain ({68m,7b,13b}, alpha 0.9 and 0.7) with the
#     runoff (f1fb52f; issue 14's one-GPU goal); on GPU 1, int4 forwards with the split-K GEMV (7B, 70B; issue 16),
#     then the same 3-stage chain's sd:8 and pipe with the orchestrator of branch i33 (fewer loop wake-ups, a middle
#     stage that waits for a drafting predecessor; in .ab/i33m, carried) for an A/B against GPU 0's rows;
#  2. then both GPUs: {68m,7b on GPU 0; 13b on GPU 1} at alpha 0.7 and 0.9, main then i33, sd:4 and pipe;
#  3. if time is left, GPU 0: {68m,7b} at alpha 0.9 with the compiled layout (PIPESPEC_STATIC_VARIANT
#     compile-layer-math) after the SymBool fix.
# Results under $OUT: *.md/json per step, levers5.log. PIPESPEC_COMMIT names the main commit (the copy's .git is stale).
set -u
source "$(dirname "$0")/gpu_env.sh"
O=${OUT:-/tmp/levers5}; mkdir -p "$O"
T0=$(date +%s)
MAIN_PATH=$PYTHONPATH
I33_PATH=/tmp/site:$PWD/.ab/i33m:$PWD
MAIN_COMMIT=${PIPESPEC_COMMIT:-unknown}
I33_COMMIT="i33m $(cat .ab/i33m/COMMIT 2>/dev/null)"
export PIPESPEC_COMMIT=$MAIN_COMMIT
left() { echo $(( $1 - ($(date +%s) - T0) )); }
save() { cp "$1/probe.md" "$O/$2.md" 2>/dev/null; cp "$1/probe.json" "$O/$2.json" 2>/dev/null; }
{
  echo "== gpu tests $(date +%T)"
  timeout 90 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_verify.py tests/test_readback.py 2>&1 | tail -n 3

  echo "== auto (GPU 0) | int4 then i33 3-stage (GPU 1) $(date +%T)"
  timeout 230 python3 scripts/gpu_pipe_probe.py /tmp/auto --chains "13b on GPU 0" --alphas 0.9,0.7 \
      --methods ar,sd:4,sd:8,pipe,auto --repeats 3 --budget-s 160 > /tmp/auto.log 2>&1 &
  AUTO=$!
  CUDA_VISIBLE_DEVICES=1 timeout 110 python3 scripts/gpu_quant.py /tmp/quant --shapes 7b,70b --kernels triton \
      --no-linear --variant compile-layer --budget 90 > /tmp/quant.log 2>&1
  echo "quant rc=$?"
  cp /tmp/quant/gpu_quant.md "$O/quant.md"; cp /tmp/quant/gpu_quant.json "$O/quant.json"
  L=$(left 235)
  echo "i33 3-stage on GPU 1: ${L} s"
  CUDA_VISIBLE_DEVICES=1 PYTHONPATH=$I33_PATH PIPESPEC_COMMIT=$I33_COMMIT timeout $L python3 scripts/gpu_pipe_probe.py /tmp/i33one \
      --chains "13b on GPU 0" --alphas 0.9,0.7 --methods sd:8,pipe --repeats 3 --budget-s $(( L - 45 )) \
      > /tmp/i33one.log 2>&1
  echo "i33one rc=$?"
  wait $AUTO; echo "auto rc=$?"
  tail -n 4 /tmp/auto.log; tail -n 4 /tmp/quant.log; tail -n 4 /tmp/i33one.log
  save /tmp/auto auto; save /tmp/i33one i33one

  L=$(left 375)
  echo "== 2 GPUs, main $(date +%T), ${L} s"
  timeout $L python3 scripts/gpu_pipe_probe.py /tmp/two --chains "13b on GPU 1" --alphas 0.7,0.9 \
      --methods sd:4,pipe --repeats 3 --budget-s $(( L - 45 )) > /tmp/two.log 2>&1
  echo "two rc=$?"; tail -n 3 /tmp/two.log; save /tmp/two two
  L=$(left 505)
  echo "== 2 GPUs, i33 $(date +%T), ${L} s"
  PYTHONPATH=$I33_PATH PIPESPEC_COMMIT=$I33_COMMIT timeout $L python3 scripts/gpu_pipe_probe.py /tmp/twoi33 --chains "13b on GPU 1" \
      --alphas 0.7,0.9 --methods sd:4,pipe --repeats 3 --budget-s $(( L - 45 )) > /tmp/twoi33.log 2>&1
  echo "twoi33 rc=$?"; tail -n 3 /tmp/twoi33.log; save /tmp/twoi33 twoi33

  L=$(left 560)
  echo "== compiled layout chain $(date +%T), ${L} s"
  if [ "$L" -gt 60 ]; then
    CUDA_VISIBLE_DEVICES=0 PIPESPEC_STATIC_VARIANT=compile-layer-math timeout $L python3 scripts/gpu_pipe_probe.py \
        /tmp/comp --chains "7b on GPU 0" --one-gpu --alphas 0.9 --methods sd:8,pipe --repeats 3 \
        --budget-s $(( L - 30 )) > /tmp/comp.log 2>&1
    echo "comp rc=$?"; tail -n 5 /tmp/comp.log; save /tmp/comp comp
  fi
  echo "== end $(date +%T)"
} > "$O/levers5.log" 2>&1
grep -E "^==|rc=|passed|failed|Error" "$O/levers5.log" | cut -c1-300
