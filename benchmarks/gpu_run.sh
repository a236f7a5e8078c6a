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
#        timeout_s: 600   (the check budgets itself to 360 s, --budget; the rest is slack)
#    It first checks .gpu/ (seconds, before anything touches the GPU; exit 2 and a report in
#    $OUT naming what is missing), then runs the parts: cost, accuracy, tests, compile,
#    compare. What comes back under $OUT, rewritten after every part: gpu_report.md,
#    gpu_report.json, gpu_tests_junit.xml, gpu_compile_junit.xml, gpu_check.log,
#    compare_results.jsonl, compare_accuracy.png. Arguments go to gpu_check.py: a rerun within
#    the device time left can take a subset of the parts (or 1-5), e.g.
#    `bash benchmarks/gpu_run.sh --parts cost --budget 120`; their shares of the budget are
#    110, 40, 90, 60 and 60 s.
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

out="${OUT:-.}"
missing=()
[[ -f .gpu/cifar10-jpeg.tar.gz ]] || missing+=(".gpu/cifar10-jpeg.tar.gz")
compgen -G ".gpu/torch_tract-*.whl" >/dev/null || missing+=(".gpu/torch_tract-1.0.0 wheel")
if ((${#missing[@]})); then
    message="missing ${missing[*]} (run 'bash benchmarks/gpu_run.sh prepare' here and carry .gpu)"
    echo "pre-flight failed: $message" | tee "$out/gpu_check.log"
    printf '# TrAct GPU check\n\n- **pre-flight**: **failed**: %s\n' "$message" >"$out/gpu_report.md"
    exit 2
fi

site="${SITE:-/tmp/site}"  # where the carried wheels are installed
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .gpu/*.whl
export PYTHONPATH="$PWD/src:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv || true
python3 benchmarks/gpu_check.py --dataset .gpu/cifar10-jpeg.tar.gz --out gpu_report.md "$@" 2>&1 \
    | tee "$out/gpu_check.log"
