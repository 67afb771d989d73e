#!/usr/bin/env bash
# Thirteenth session, ONE H200, ~6.5 minutes (issue 14): the adaptive runtime's outlier clipping and lock-step
# probes (policy.OUTLIER, policy.PROBE_EVERY) on the one-GPU goal rows, against the runtime without them, in one run.
#  1. gpu_check.py (the built-in family, 3 stages on cuda:0: ar / sd / pipe give the same tokens, greedy and sampled);
#  2. one GPU, 256 tokens after 128, 3 warm repeats: {68m,7b}, {1b,8b}, {68m,7b,13b} at alpha 0.9 / 0.7: ar,
#     sd:4/8/16, pipe, pipe:unclipped (the runtime before: every forward counted in full, no probes), round-robin;
#     outputs checked against ar, in-pipeline ms per forward against standalone;
#  3. capture ahead (workers.static.reachable): `pipespec run` of the built-in family on cuda:0, 512 tokens (past
#     the first 256-position context bucket), each a fresh process, with PIPESPEC_CAPTURE_AHEAD=0 and =1, ar and pipe.
# Usage: PIPESPEC_COMMIT=<sha> bash scripts/gpu_levers35.sh      Results: $OUT/levers35.log (+ .tgz)
set -u
source "$(dirname "$0")/gpu_env.sh"
levers_begin levers35
{
  echo "== $PIPESPEC_COMMIT $(date +%T)"; nproc; nvidia-smi -L
  echo "== check $(date +%T)"; check_chain default 90
  echo "== one GPU $(date +%T)"
  timeout 320 python3 scripts/gpu_pipe_probe.py "$W/probe" --one-gpu \
      --chains "7b on GPU 0,8b on GPU 0,13b on GPU 0" --alphas 0.9,0.7 \
      --methods ar,sd:4,sd:8,sd:16,pipe,pipe:unclipped --tokens 256 --repeats 3 --budget-s 215 > "$W/probe.log" 2>&1
  echo "probe rc=$?"; grep -E "alpha|FAILED|Error" "$W/probe.log" | cut -c1-600
  echo "== capture ahead $(date +%T)"
  for mode in ar pipe; do
    for ahead in 0 1; do
      export PIPESPEC_CAPTURE_AHEAD=$ahead; runcli "$mode-ahead$ahead" --mode "$mode" -n 512
    done
  done
  unset PIPESPEC_CAPTURE_AHEAD
  python3 -c "import json,sys; ids=[json.load(open(f))['token_ids'] for f in sys.argv[1:]]; print('capture ahead:',
      'identical' if all(i == ids[0] for i in ids) else 'MISMATCH', [len(i) for i in ids])" "$W"/cli-*-ahead*.json
  echo "== end $(date +%T)"
} > "$O/levers35.log" 2>&1
levers_end
