#!/usr/bin/env bash
# On a GPU machine: train the bench family into .bench-family/ (git-ignored; it stays while the machine stays up).
# Usage: scripts/gpu_train_bench_family.sh [cuda:N] [training minutes] [deadline minutes]
#
# Sizes (vocab 4096, tied embeddings): draft 256x2 (~2.6M parameters), middle 384x6 (~12M), target 512x16 (~53M).
# Why these: at batch 1 a forward this small is bound by kernel launches, i.e. by depth, not by bytes read, so the
# per-forward cost ratio draft : middle : target follows the layer counts, about 1 : 3 : 7 with CUDA graphs -- the
# nearest a few minutes of training gets to a real chain's (68m : 7b : 13b is ~1 : 21 : 33 on an H200). Widths are
# kept small so the target still sees ~40-60M tokens in ~2.3 minutes (the old 1280x20 target, ~400M parameters,
# got ~13M tokens at a peak LR of 2e-3 in its 2-3 minutes and wrote 'n_t_t_t_...': far too little training for its
# size). LRs are the script's defaults scaled down for depth (1e-3 target).
set -euo pipefail
device=${1:-cuda:0}
minutes=${2:-4.2}
deadline=${3:-5.6}
out=${PIPESPEC_FAMILY_OUT:-.bench-family}
args=(--draft-size 256,2,4,768 --middle-size 384,6,6,1024 --target-size 512,16,8,1408
      --include-site-packages --site-packages-mb 80 --tokenizer-mb 20 --batch-size 32 --seq-len 1024
      --minutes "$minutes" --deadline-minutes "$deadline" --eval-tokens 131072 --target-share 0.62)
if [ "${PIPESPEC_SUITE_DEVICE:-}" = "cpu" ]; then  # the suite's CPU smoke run: tiny everything, a few steps
    args=(--tiny --threads 1 --max-files 40 --vocab-size 512 --seq-len 64 --batch-size 4 --eval-tokens 2048
          --tokenizer-mb 1 --minutes 0 --target-steps 4 --student-steps 4)
fi
"${PY:-python3}" scripts/train_family.py --out "$out" --device "$device" "${args[@]}" \
    --target-lr 1e-3 --middle-lr 2e-3 --draft-lr 3e-3 --warmup-steps 100 --eval-reserve-s 45 \
    --spec-prompts 30 --spec-rounds 3
