#!/usr/bin/env bash
# pipespec's GPU suite: everything docs/benchmarks.md reports, in two commands of under 10 minutes each.
#
#   bash scripts/gpu_suite.sh part1   # wheels, crash-diagnosis matrix, GPU tests, correctness on 1 and 2 GPUs,
#                                     # then (time permitting) per-forward latency and the synthetic sweep
#   bash scripts/gpu_suite.sh part2   # train the bench family (~5 min), five-method bench on 1 GPU and on 2 GPUs
#   bash scripts/gpu_suite.sh part3   # optional: latency table + synthetic sweep alone (if part1 ran out of time)
#   bash scripts/gpu_suite.sh levers  # issue 16: forward variants, 8-bit weights, tensor parallel (2 GPUs)
#   bash scripts/gpu_suite.sh chains  # issue 14: GPU tests, pipe vs sd on one GPU (thread vs process + MPS), 2 GPUs
#
# Results: $OUT (default ./gpu-out) gets at most 8 files: PART-summary.md (paste from it), PART-steps.json (every
# step: exit status, seconds), PART-results.tar.gz (every log, JSON, Markdown and chart; no model weights) and the
# main JSON files. Work files live in $PIPESPEC_SUITE_WORK (default /tmp/pipespec-suite).
#
# Every step runs under `timeout`; a failing or timed-out step is recorded and the next one runs; steps that no
# longer fit in the part's budget (PIPESPEC_SUITE_BUDGET_S, default 550 s / 555 s from the start) are recorded as
# skipped, so a part always ends and packs its results; the results are also re-packed after every step, so even a
# part killed from outside leaves what it had in $OUT.
# CPU smoke run (here, without a GPU: shell and argument bugs): PIPESPEC_SUITE_DEVICE=cpu bash scripts/gpu_suite.sh part1
set -uo pipefail   # no -e: one failing step must not stop the others

PART=${1:-}
case "$PART" in part1|part2|part3|levers|chains) ;; *) echo "usage: $0 part1|part2|part3|levers|chains" >&2; exit 2 ;; esac
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PY:-python3}
OUT=${OUT:-$ROOT/gpu-out}
WORK=${PIPESPEC_SUITE_WORK:-/tmp/pipespec-suite}
RUN=$WORK/$PART
DEVICE=${PIPESPEC_SUITE_DEVICE:-cuda}
# the device call's limit is 600 s for the command; leave ~45 s for Python start-up jitter and the last pack
case "$PART" in part1) BUDGET=${PIPESPEC_SUITE_BUDGET_S:-550} ;; *) BUDGET=${PIPESPEC_SUITE_BUDGET_S:-555} ;; esac
START=$(date +%s)
DEADLINE=$((START + BUDGET))
PACK_RESERVE=12
rm -rf "$RUN" && mkdir -p "$RUN/logs" "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PY
export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STEPS=$RUN/steps.jsonl
: > "$STEPS"

say() { echo "[suite $(date +%T) +$(( $(date +%s) - START ))s] $*" | tee -a "$RUN/suite.log"; }

record() {  # record NAME STATUS RC SECONDS TIMEOUT NOTE
    printf '{"step": "%s", "status": "%s", "rc": %s, "seconds": %s, "timeout": %s, "note": "%s"}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6//\"/\'}" >> "$STEPS"
}

# step NAME TIMEOUT_S CMD...: run CMD under timeout, its stdout+stderr in logs/NAME.log (tail shown); never fails
step() {
    local name=$1 limit=$2; shift 2
    local now left rc t0 secs status
    now=$(date +%s); left=$((DEADLINE - PACK_RESERVE - now))
    if (( left < 20 )); then
        say "$name: skipped (no time left in this part's ${BUDGET}s budget)"
        record "$name" skipped null 0 "$limit" "no time left"; return 0
    fi
    (( limit > left )) && limit=$left
    say "$name: start (timeout ${limit}s): $*"
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$RUN/logs/$name.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - t0 ))
    case $rc in 0) status=ok ;; 124|137) status=timeout ;; *) status=failed ;; esac
    tail -n 4 "$RUN/logs/$name.log" | sed "s/^/    [$name] /" | cut -c1-220
    say "$name: $status (exit $rc, ${secs}s)"
    record "$name" "$status" "$rc" "$secs" "$limit" ""
    pack quiet
    return 0
}

status_of() { grep "\"step\": \"$1\"" "$STEPS" | tail -n 1 | sed 's/.*"status": "\([a-z]*\)".*/\1/'; }

pack() {
    [ "${1:-}" = quiet ] || say "packing"
    $PY scripts/gpu_suite_summary.py "$RUN" "$PART" > "$RUN/logs/summary.log" 2>&1 \
        || echo "(summary script failed: see logs/summary.log)" >> "$RUN/summary.md"
    [ -f "$RUN/summary.md" ] || echo "# $PART: no summary (gpu_suite_summary.py failed)" > "$RUN/summary.md"
    cp "$RUN/summary.md" "$OUT/$PART-summary.md"
    $PY - "$STEPS" "$OUT/$PART-steps.json" <<'EOF' || cp "$STEPS" "$OUT/$PART-steps.json"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
json.dump(rows, open(sys.argv[2], "w"), indent=1)
EOF
    tar -czf "$OUT/$PART-results.tar.gz" -C "$WORK" --exclude='*.safetensors' --exclude='*.bin' \
        --exclude='randfam' "$PART"
    for f in "${MAIN_JSON[@]}"; do
        [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/$PART-$(echo "$f" | tr '/' '-')"
    done
    [ "${1:-}" = quiet ] || say "done: $(ls "$OUT" | tr '\n' ' ')"
}

# -- shared steps -------------------------------------------------------------------------------------------------

wheels() {
    local have=() missing
    if compgen -G ".whl/*.whl" > /dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl 2>&1 | tail -n 3
        have=(.whl/*.whl)
    fi
    missing=$($PY - <<'EOF'
import importlib.util
need = {"torch": "torch", "transformers": "transformers", "anyio": "anyio", "structlog": "structlog",
        "rich": "rich", "click": "click", "safetensors": "safetensors", "pytest": "pytest",
        "pytest_asyncio": "pytest-asyncio", "pynvml": "nvidia-ml-py", "tokenizers": "tokenizers", "numpy": "numpy",
        "matplotlib": "matplotlib"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
    say "wheels: installed ${#have[@]} carried wheel(s) into /tmp/site; missing: ${missing:-none}"
    echo "${missing:-none}" > "$RUN/missing.txt"
    $PY - <<'EOF' > "$RUN/env.json" 2>/dev/null
import json, platform, subprocess
import torch, transformers
gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
import os
commit = os.environ.get("PIPESPEC_COMMIT")  # the copy on a GPU machine may have no .git: the lead passes it
if not commit:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip() or None
    except OSError:
        commit = None
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "gpus": gpus, "cpus": __import__("os").cpu_count(),
                  "commit": commit}))
EOF
}

NGPU=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
[ "$DEVICE" = cpu ] && NGPU=0
MAIN_JSON=()
say "$PART on $DEVICE ($NGPU GPU(s)); budget ${BUDGET}s; work folder $RUN; results to $OUT"
wheels

# bench arguments of the crash matrix / the five-method bench, per device
if [ "$DEVICE" = cpu ]; then
    place() { echo "cpu,cpu,cpu"; }
    BENCH_DEV=(--device cpu --dtype float32)
else
    place() { echo "$1"; }
    BENCH_DEV=(--device cuda --dtype bfloat16)
fi

latency_and_synthetic() {
    if [ "$DEVICE" = cpu ]; then say "latency, synthetic: skipped on the CPU"; return; fi
    step latency 120 $PY scripts/gpu_latency.py --shapes 68m,7b,13b --reps 15 --no-compile --json "$RUN/latency.json"
    if (( NGPU >= 2 )); then
        step synthetic_2gpu 140 $PY scripts/gpu_synthetic.py --chain 68m@0,7b@0,13b@1 --alphas 0.7,0.9 \
            --repeats 3 --sd-lookaheads 2,4,8,16 --tokens 128 --json "$RUN/synthetic-2gpu.json"
    fi
    step synthetic_1gpu 90 $PY scripts/gpu_synthetic.py --chain 68m@0,7b@0 --alphas 0.7,0.9 \
        --repeats 3 --sd-lookaheads 2,4,8,16 --tokens 128 --json "$RUN/synthetic-1gpu.json"
}

# -- part 1 -------------------------------------------------------------------------------------------------------

diag() {  # diag NAME TIMEOUT [ENV=VALUE ...] -- BENCH ARGS...
    local name=$1 limit=$2; shift 2
    local envs=()
    while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do envs+=("$1"); shift; done
    shift
    mkdir -p "$RUN/diag"
    # the report goes to a file; stdout is only the JSON, stderr the progress and any crash
    step "diag_$name" "$limit" bash -c 'out=$1; shift; env "$@" > "$out"' _ "$RUN/diag/$name.json" \
        "${envs[@]}" $PY -m pipespec bench "${DIAG_ARGS[@]}"
}

if [ "$PART" = part1 ]; then
    MAIN_JSON=(latency.json synthetic-2gpu.json synthetic-1gpu.json diag/thread_hf_first.json)
    # first what the suite is for: the GPU tests (among them all five bench methods in one process, in either order,
    # and the minimal reproduction of issue 13's crash), correctness, latency and the synthetic sweep; the
    # crash-diagnosis benches after them, as time allows
    step gpu_tests 240 $PY -m pytest -m gpu tests/ -q -p no:cacheprovider -o addopts="" \
        --junitxml="$RUN/gpu-tests.xml" -rfEsxX
    if [ "$DEVICE" = cpu ]; then
        say "gpu_check: skipped on the CPU"
    else
        step gpu_check_1gpu 75 $PY scripts/gpu_check.py cuda:0,cuda:0,cuda:0
        if (( NGPU >= 2 )); then step gpu_check_2gpu 75 $PY scripts/gpu_check.py cuda:0,cuda:0,cuda:1; fi
    fi

    latency_and_synthetic
    if [ "$DEVICE" = cpu ]; then
        FAM=$ROOT/pipespec/assets/family
        DIAG_ARGS=(--models "$FAM/draft,$FAM/middle,$FAM/target" "${BENCH_DEV[@]}" --placement "$(place 0,0,0)"
                   --prompts code --n 1 --max-new-tokens 8 --json)
    else
        FAM=$RUN/randfam
        step random_family 60 $PY scripts/make_random_family.py "$FAM"
        DIAG_ARGS=(--models "$FAM/draft,$FAM/middle,$FAM/target" "${BENCH_DEV[@]}" --placement "$(place 0,0,0)"
                   --prompts code --n 2 --max-new-tokens 48 --json)
    fi
    ALL=hf,hf_assisted,ar,sd,pipe
    base=("${DIAG_ARGS[@]}")
    # d1..d5: the matrix's core; each bench in a fresh process
    DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods $ALL --repeats 2); diag thread_hf_first 120 --
    DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods ar,sd,pipe,hf,hf_assisted --repeats 2)
    diag thread_ours_first 90 --

    # the rest of the matrix only if an in-process combination broke: which ingredient matters?
    failed_diags() {
        local d st
        for d in "$@"; do
            st=$(status_of "diag_$d")
            if [ -n "$st" ] && [ "$st" != ok ] && [ "$st" != skipped ]; then echo "$d"; fi
        done
    }
    crashed=($(failed_diags thread_hf_first thread_ours_first))
    if (( ${#crashed[@]} )) || [ "${PIPESPEC_SUITE_FULL_MATRIX:-0}" = 1 ]; then
        say "in-process failures: ${crashed[*]:-none (full matrix forced)}; narrowing down"
        DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods hf,ar --repeats 2); diag thread_hf_ar 60 --
        DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods hf,hf_assisted); diag thread_hf_only 60 --
        crashed=($(failed_diags thread_hf_first thread_ours_first thread_hf_ar thread_hf_only))
        DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods $ALL)
        diag thread_no_our_graphs 60 PIPESPEC_CUDA_GRAPHS=0 --
        DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods $ALL --hf-compile-mode default)
        diag thread_hf_no_cudagraphs 60 --
        DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods $ALL)
        diag thread_no_static_path 60 PIPESPEC_FAST=0 --
        DIAG_ARGS=("${base[@]}" --hf-isolation thread --methods hf_assisted,ar,sd,pipe)
        diag thread_assisted_ours 60 --
        # the smallest failing combination, once, under compute-sanitizer (slow: one prompt, few tokens)
        smallest=""
        for d in thread_hf_ar thread_hf_only thread_ours_first thread_hf_first; do
            for c in "${crashed[@]}"; do [ "$c" = "$d" ] && [ -z "$smallest" ] && smallest=$d; done
        done
        SAN=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
        if [ -n "$smallest" ] && [ -n "$SAN" ] && [ "$DEVICE" != cpu ]; then
            case $smallest in
                thread_hf_ar) m=hf,ar ;; thread_hf_only) m=hf,hf_assisted ;;
                thread_ours_first) m=ar,sd,pipe,hf,hf_assisted ;; *) m=$ALL ;;
            esac
            step sanitizer 130 "$SAN" --tool memcheck --print-limit 20 --target-processes all \
                --log-file "$RUN/logs/sanitizer-report.txt" \
                $PY -m pipespec bench --models "$FAM/draft,$FAM/middle,$FAM/target" "${BENCH_DEV[@]}" \
                --placement 0,0,0 --prompts code --n 1 --max-new-tokens 16 --hf-isolation thread --methods "$m" --json
        else
            say "sanitizer: not run (smallest failing: ${smallest:-none}; compute-sanitizer: ${SAN:-not found})"
        fi
    fi
    # last, as time allows: the HF baselines in child processes (--hf-isolation process; slow to start)
    DIAG_ARGS=("${base[@]}" --hf-isolation process --methods $ALL --repeats 2); diag process_hf 150 --
fi

# -- part 2 -------------------------------------------------------------------------------------------------------

if [ "$PART" = part2 ]; then
    MAIN_JSON=(family-metrics.json bench-1gpu/bench.json bench-2gpu/bench.json)
    FAMILY=$RUN/family
    if [ "$DEVICE" = cpu ]; then
        tdev=cpu; train_min=0; deadline_min=3
    else
        tdev=cuda:0
        # leave ~300 s for the two benches (HF's compile ~30-60 s, HF eager and assisted are slow) and packing; the
        # rest is the family's: corpus + tokenizer (~40 s), training, saving + evaluation (~45 s)
        room=$(( DEADLINE - $(date +%s) - 300 ))
        deadline_min=$($PY -c "print(round(max($room, 150) / 60, 2))")
        train_min=$($PY -c "print(round(max($room - 95, 90) / 60, 2))")
    fi
    say "family: training budget ${train_min} min, deadline ${deadline_min} min"
    step train_family $(( ${deadline_min%.*} * 60 + 90 )) env PIPESPEC_FAMILY_OUT="$FAMILY" \
        bash scripts/gpu_train_bench_family.sh "$tdev" "$train_min" "$deadline_min"
    if [ -f "$FAMILY/metrics.json" ]; then cp "$FAMILY/metrics.json" "$RUN/family-metrics.json"; fi
    MODELS="$FAMILY/draft,$FAMILY/middle,$FAMILY/target"
    if [ "$DEVICE" = cpu ]; then
        ARGS=(--n 1 --max-new-tokens 8 --repeats 2)
    else
        ARGS=(--n 4 --max-new-tokens 128 --repeats 3)
    fi
    if [ -f "$FAMILY/target/config.json" ]; then
        # all five methods in ONE process (HF in a thread of the bench's own process): what issue 13 asks of bench
        step bench_1gpu 160 $PY -m pipespec bench --models "$MODELS" "${BENCH_DEV[@]}" --placement "$(place 0,0,0)" \
            --prompts code --hf-isolation thread "${ARGS[@]}" --out "$RUN/bench-1gpu"
        if (( NGPU >= 2 )) || [ "$DEVICE" = cpu ]; then
            step bench_2gpu 130 $PY -m pipespec bench --models "$MODELS" "${BENCH_DEV[@]}" \
                --placement "$(place 0,0,1)" --prompts code --hf-isolation thread "${ARGS[@]}" --out "$RUN/bench-2gpu"
        fi
    else
        say "bench: skipped (no trained family)"; record bench_1gpu skipped null 0 0 "no trained family"
    fi
fi

if [ "$PART" = part3 ]; then
    MAIN_JSON=(latency.json synthetic-2gpu.json synthetic-1gpu.json)
    latency_and_synthetic
fi

# -- levers (issue 16) and chains (issue 14) -----------------------------------------------------------------------

SMOKE=()
[ "$DEVICE" = cpu ] && SMOKE=(--smoke)

if [ "$PART" = levers ]; then
    MAIN_JSON=(forward/gpu_forward.json quant/gpu_quant.json tp/gpu_tp.json)
    VARIANTS=${PIPESPEC_FORWARD_VARIANTS:-base,lean,compile-layer,compile-parts,lean-math}
    if (( NGPU >= 2 )); then
        # forward variants on GPU 0 and 8-bit weights on GPU 1 at the same time (separate memories, 32 cores)
        step forward_and_quant 290 bash -c '
            CUDA_VISIBLE_DEVICES=0 $PY scripts/gpu_forward.py "$0/forward" --variants "$1" --budget-s 250 \
                > "$0/logs/forward.log" 2>&1 &
            a=$!
            CUDA_VISIBLE_DEVICES=1 $PY scripts/gpu_quant.py "$0/quant" --budget 250 > "$0/logs/quant.log" 2>&1 &
            b=$!
            wait $a; ra=$?; wait $b; rb=$?
            tail -n 3 "$0/logs/forward.log" "$0/logs/quant.log"; exit $(( ra | rb ))' "$RUN" "$VARIANTS"
        step tp 200 $PY scripts/gpu_tp.py "$RUN/tp" --budget-s 180
    else
        step forward 200 $PY scripts/gpu_forward.py "$RUN/forward" --variants "$VARIANTS" --budget-s 170 "${SMOKE[@]}"
        step quant 180 $PY scripts/gpu_quant.py "$RUN/quant" --budget 150 "${SMOKE[@]}"
        if [ "$DEVICE" = cpu ]; then step tp 170 $PY scripts/gpu_tp.py "$RUN/tp" --budget-s 140 "${SMOKE[@]}"; fi
    fi
fi

if [ "$PART" = chains ]; then
    MAIN_JSON=(probe1/probe.json probe2/probe.json forward/gpu_forward.json quant70/gpu_quant.json quant7/gpu_quant.json)
    PROBE_METHODS=${PIPESPEC_PROBE_METHODS:-ar,sd:4,sd:8,sd:16,pipe,auto}
    step gpu_tests 150 $PY -m pytest -m gpu tests/ -q -p no:cacheprovider -o addopts="" \
        --junitxml="$RUN/gpu-tests.xml" -rfEsxX
    if (( NGPU >= 2 )); then
        # GPU 0: one-GPU chains, thread vs process (+ MPS); GPU 1 meanwhile: the forward layouts, 8-bit weights
        step probe_1gpu_and_levers 310 bash -c '
            CUDA_VISIBLE_DEVICES=0 $PY scripts/gpu_pipe_probe.py "$0/probe1" --backends thread,process --one-gpu \
                --methods "$1" --budget-s 250 > "$0/logs/probe1.log" 2>&1 &
            a=$!
            (
                export CUDA_VISIBLE_DEVICES=1
                $PY scripts/gpu_forward.py "$0/forward" --budget-s 110 \
                    --variants base,lean,lean-math,compile-layer-math,compile-layer > "$0/logs/forward.log" 2>&1
                $PY scripts/gpu_quant.py "$0/quant70" --shapes 70b --kernels triton --no-linear \
                    --variant compile-layer --budget 80 > "$0/logs/quant70.log" 2>&1
                $PY scripts/gpu_quant.py "$0/quant7" --shapes 7b,13b --kernels triton --no-linear \
                    --variant compile-layer --budget 70 > "$0/logs/quant7.log" 2>&1
            ) &
            b=$!
            wait $a; ra=$?; wait $b; rb=$?
            tail -n 2 "$0"/logs/probe1.log "$0"/logs/forward.log "$0"/logs/quant*.log; exit $(( ra | rb ))' \
            "$RUN" "$PROBE_METHODS"
        step probe_2gpu 110 $PY scripts/gpu_pipe_probe.py "$RUN/probe2" --chains "13b on GPU 1" --alphas 0.7,0.9 \
            --methods "$PROBE_METHODS" --repeats 3 --budget-s 85
    else
        step probe_1gpu 290 $PY scripts/gpu_pipe_probe.py "$RUN/probe1" --backends thread,process --one-gpu \
            --methods "$PROBE_METHODS" --budget-s 250 "${SMOKE[@]}"
    fi
fi

pack
