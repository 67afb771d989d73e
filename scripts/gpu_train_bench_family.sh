#!/usr/bin/env bash
# On a GPU machine: train the bench family (~5M / ~50M / ~400M parameters) into .bench-family/ (git-ignored; it stays
# while the machine stays up). Usage: scripts/gpu_train_bench_family.sh [cuda:N] [minutes]
set -euo pipefail
device=${1:-cuda:0}
minutes=${2:-3}
python3 scripts/train_family.py --out .bench-family --device "$device" --include-site-packages \
    --draft-size 256,4,4,768 --middle-size 640,10,10,1792 --target-size 1280,20,20,3456 \
    --batch-size 32 --minutes "$minutes" --deadline-minutes "$(python3 -c "print($minutes + 1.5)")" --spec-rounds 2
