#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py) on a lent device machine: one prepared run.
#
# 1. Here, once, from the repository's root (the archive defaults to ../shared/data's copy):
#        bash benchmarks/gpu_run.sh prepare [path/to/cifar10-jpeg.tar.gz]
#    copies the CIFAR-10 archive (19.8 MB) and downloads the torch_tract 1.0.0 wheel (reference
#    implementation, for the stem comparison) into .gpu/, which .gitignore keeps out of git.
#    The machine's image brings pytest, hypothesis, numpy, pillow, matplotlib, timm,
#    torchvision and transformers; trainact itself is imported from src/ (PYTHONPATH).
# 2. The device tool's run, from the same checkout:
#        command: bash benchmarks/gpu_run.sh
#        carry:   [".gpu"]
#        timeout_s: 600   (the check budgets itself to 480 s, --budget)
#    What comes back under $OUT: gpu_report.md, gpu_report.json, gpu_tests_junit.xml,
#    gpu_check.log, compare_results.jsonl, compare_accuracy.png. Arguments go to
#    gpu_check.py: a rerun within the device time left can take a subset of the parts
#    (tests overhead accuracy compare, or 1-4), e.g. `bash benchmarks/gpu_run.sh --parts tests`;
#    their shares of the budget are 270, 50, 30 s and the rest (about 130 s) for compare.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == prepare ]]; then
    archive="${2:-../shared/data/cifar10-jpeg.tar.gz}"
    mkdir -p .gpu
    install -m 0644 "$archive" .gpu/cifar10-jpeg.tar.gz
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 -d .gpu torch_tract==1.0.0
    du -sh .gpu
    exit 0
fi

site="${SITE:-/tmp/site}"  # where the carried wheels are installed
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .gpu/*.whl
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv || true
python3 benchmarks/gpu_check.py --dataset .gpu/cifar10-jpeg.tar.gz --out gpu_report.md "$@" 2>&1 \
    | tee "${OUT:-.}/gpu_check.log"
