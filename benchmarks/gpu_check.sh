#!/usr/bin/env bash
# The GPU check (nbhelpers/tools/gpu_check.py): environment, training throughput, the seed001
# protocol and the torchrun/DDP path on the GPUs of this machine, in about 8 minutes, writing
# gpu_*.txt (and this run's log, gpu_check.log) to $OUT, else results/benchmarks.
#
# It runs with the machine's own python3 (torch, torchvision, timm, scikit-learn, scipy, OpenCV,
# pandas; nothing installed from this project) on a cache built beforehand where the sources are:
#   workbook gpu-check build-cache --data-dir D --out gpu_cache
# Usage: bash benchmarks/gpu_check.sh [--dry-run] [--minutes M] [--steps env throughput ...]
#   GPU_PYTHON=.venv/bin/python  another interpreter    GPU_CACHE=folder  another cache folder
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PYTHON:-python3}
DEST=${OUT:-results/benchmarks}
mkdir -p "$DEST"
export PYTHONUNBUFFERED=1 CXR_PROGRESS=quiet
"$PY" -m nbhelpers.tools.gpu_check --cache "${GPU_CACHE:-gpu_cache}" --out "$DEST" "$@" 2>&1 | tee "$DEST/gpu_check.log"
