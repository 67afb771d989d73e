# Sourced by the one-call GPU scripts (gpu_recheck.sh, gpu_levers3.sh, gpu_tp_chain.sh): to the repository root, the
# carried wheels (structlog, pytest-asyncio) into /tmp/site once per machine (a script that sources this and then
# runs another that does too installs them once), and the environment: offline, unbuffered, NVLink multicast off.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -z "${PIPESPEC_GPU_ENV:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>/dev/null
fi
export PIPESPEC_GPU_ENV=1 PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 \
       TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# The one-call scripts' frame (gpu_levers13.sh on): `levers_begin NAME` sets $O (what comes back: $OUT, or /tmp/NAME
# elsewhere) and $W (a fresh work folder); `levers_end` copies the log ($O/NAME.log) into $W, packs $W into one tar
# ($O/NAME.tgz: the device returns at most 8 files) and prints the log.
levers_begin() {
    LEVERS=$1; O=${OUT:-/tmp/$1}; W=/tmp/$1
    mkdir -p "$O"; rm -rf "$W"; mkdir -p "$W"
}
levers_end() {
    cp "$O/$LEVERS.log" "$W/"
    tar czf "$O/$LEVERS.tgz" -C "$W" . 2>/dev/null
    cat "$O/$LEVERS.log"
}
# `check_chain LABEL SECONDS [VAR=VALUE ...]`: gpu_check.py (the built-in family on cuda:0: ar, sd and pipe give the
# same tokens, greedy and sampled) under those variables; its verdict lines into the log.
check_chain() {
    local label=$1 limit=$2; shift 2
    env "$@" timeout "$limit" python3 scripts/gpu_check.py cuda:0,cuda:0,cuda:0 > "$W/check-$label.log" 2>&1
    echo "check $label rc=$?"; grep -E "identical|ALL OK|MISMATCH|Error" "$W/check-$label.log" | head -6
}
# `gpu_tests SECONDS`: the gpu-marked tests of the static path and the Triton attention.
gpu_tests() {
    timeout "$1" python3 -m pytest -q -m gpu tests/test_static.py tests/test_triton_attention.py > "$W/pytest.log" 2>&1
    echo "pytest rc=$?"; tail -2 "$W/pytest.log"
}
# `sim NAME PYTHONPATH-PREFIX`: the orchestrator on two pinned cores of this machine (`taskset -c 0,1 pipespec
# simulate --latencies-ms 0.5,5,20 --acceptance 0.8,0.8 --tokens 400`) with the tree the prefix names first (empty:
# this one); its figures into the log. Run from /tmp: with -m the working directory comes first on sys.path.
sim() {  # NAME PYTHONPATH-PREFIX (run from /tmp: with -m the working directory comes first on sys.path)
  (cd /tmp && PYTHONPATH=/tmp/site:$2$OLDPWD timeout 60 taskset -c 0,1 python3 -m pipespec simulate --latencies-ms 0.5,5,20 \
      --acceptance 0.8,0.8 --tokens 400 --json > "$W/sim-$1.json" 2> "$W/sim-$1.err")
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], {k: r[k] for k in (
      'orchestrator_cpu_us_per_token', 'orchestrator_overhead_us_per_token', 'loop_wakeups_per_token',
      'runner_calls_per_token', 'measured_over_simulated', 'measured_over_predicted', 'lossless')})" \
      "$W/sim-$1.json" "$1" 2>&1 | tail -1
}
# `runcli NAME ARGS...`: one `pipespec run --json` (the built-in family on cuda:0, 256 tokens) in the cache folder
# $W/cache, timed from the shell; its exit code, wall time, mode, tokens, seconds and mode auto's reason into the log.
runcli() {  # NAME ARGS...
  local name=$1; shift
  local t0; t0=$(date +%s.%N)
  PIPESPEC_CACHE_DIR=$W/cache timeout 120 python3 -m pipespec run --device cuda:0 --prompt "def fibonacci(n):" \
      -n 256 --json "$@" > "$W/cli-$name.json" 2> "$W/cli-$name.err"
  local rc=$? t1; t1=$(date +%s.%N)
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); s=r['stats']; print(sys.argv[2], 'rc', sys.argv[3],
      'wall_s', sys.argv[4], {k: s.get(k) for k in ('mode', 'tokens', 'seconds', 'reason')})" "$W/cli-$name.json" \
      "$name" "$rc" "$(python3 -c "print(round($t1 - $t0, 2))")" 2>&1 | tail -1 | cut -c1-700
}
