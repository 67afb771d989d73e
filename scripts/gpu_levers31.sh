#!/usr/bin/env bash
# Tenth session, ONE H200, <= ~9 minutes (issue 14): the draft's loop on its worker's thread (stages.draft.DraftLoop)
# against the tree before it (.ab/before: BEFORE_COMMIT's pipespec/), in the order ORDER says (the first process on
# a freshly lent machine runs slower: run it twice, once in each order):
#  1. the orchestrator on two pinned cores of this machine (taskset -c 0,1): `pipespec simulate --latencies-ms
#     0.5,5,20 --acceptance 0.8,0.8 --tokens 400 --json`, 3 runs per tree, interleaved;
#  2. one GPU, 256 tokens, 3 repeats: {68m,7b} and {68m,7b,13b} at alpha 0.9 / 0.7 (sd:8, sd:16, pipe) per tree;
#     with FULL=1 the tree after also runs {1b,8b} and ar, sd:4, auto (the one-GPU goal rows);
#  3. with CHECK=1, gpu_check.py on this tree (ar / sd / pipe give the same tokens, greedy and sampled).
# Usage: PIPESPEC_COMMIT=<sha> ORDER=after-first|before-first [FULL=1] [CHECK=1] bash scripts/gpu_levers31.sh BEFORE
# Results: $OUT/levers31.tgz (+ levers31.log).
set -u
BEFORE=$1
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers31
probe() {  # NAME PYTHONPATH-PREFIX COMMIT CHAINS METHODS LIMIT BUDGET
  PYTHONPATH=/tmp/site:$2$PWD PIPESPEC_COMMIT=$3 timeout "$6" python3 scripts/gpu_pipe_probe.py "$W/$1" --one-gpu \
      --chains "$4" --alphas 0.9,0.7 --methods "$5" --tokens 256 --repeats 3 --budget-s "$7" > "$W/$1.log" 2>&1
  echo "$1 rc=$?"; grep -E "alpha|FAILED" "$W/$1.log" | cut -c1-520
}
after() {
  if [ "${FULL:-0}" = 1 ]; then
    probe "after-$1" "" "$PIPESPEC_COMMIT" "7b on GPU 0,8b on GPU 0,13b on GPU 0" ar,sd:4,sd:8,sd:16,pipe,auto 300 215
  else
    probe "after-$1" "" "$PIPESPEC_COMMIT" "7b on GPU 0,13b on GPU 0" sd:8,sd:16,pipe 150 95
  fi
}
before() { probe "before-$1" "$PWD/.ab/before:" "$BEFORE" "7b on GPU 0,13b on GPU 0" sd:8,sd:16,pipe 150 95; }
{
  echo "== $ORDER: after $PIPESPEC_COMMIT, before $BEFORE $(date +%T)"; nproc; nvidia-smi -L
  for i in 1 2 3; do
    if [ "$ORDER" = after-first ]; then sim "after-$i" ""; sim "before-$i" "$PWD/.ab/before:"
    else sim "before-$i" "$PWD/.ab/before:"; sim "after-$i" ""; fi
  done
  echo "== one GPU $(date +%T)"
  if [ "$ORDER" = after-first ]; then after 1; before 1; else before 1; after 1; fi
  if [ "${CHECK:-0}" = 1 ]; then echo "== check $(date +%T)"; check_chain default 80; fi
  echo "== end $(date +%T)"
} > "$O/levers31.log" 2>&1
levers_end
