#!/usr/bin/env bash
# Eleventh session, ONE H200, ~3 minutes (issue 14; only ~4.5 minutes of device time were left): every stage but the
# target on its worker's thread (the middle stage joined the draft there).
#  1. gpu_check.py on this tree (the built-in family, 3 stages on cuda:0: ar / sd / pipe give the same tokens,
#     greedy and sampled): the middle stage's loop on its thread, on CUDA;
#  2. the orchestrator on two pinned cores of this machine (taskset -c 0,1): `pipespec simulate --latencies-ms
#     0.5,5,20 --acceptance 0.8,0.8 --tokens 400`, this tree and .ab/before (BEFORE's pipespec/), interleaved;
#  3. {68m,7b,13b} on one GPU at alpha 0.9, 256 tokens, 3 repeats: sd:8 and pipe, this tree only.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers32.sh BEFORE      Results: $OUT/levers32.log (+ .tgz)
set -u
BEFORE=$1
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers32
{
  echo "== after $PIPESPEC_COMMIT, before $BEFORE $(date +%T)"; nproc; nvidia-smi -L
  echo "== check $(date +%T)"; check_chain default 80
  for i in 1 2; do sim "after-$i" ""; sim "before-$i" "$PWD/.ab/before:"; done
  echo "== one GPU $(date +%T)"
  PIPESPEC_COMMIT=$PIPESPEC_COMMIT timeout 100 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu \
      --chains "68m,7b,13b on GPU 0" --alphas 0.9 --methods sd:8,pipe --tokens 256 --repeats 3 --budget-s 70 \
      > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error" "$W/probe.log" | cut -c1-520
  echo "== end $(date +%T)"
} > "$O/levers32.log" 2>&1
levers_end
