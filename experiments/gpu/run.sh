#!/usr/bin/env bash
# The GPU check in one command: its JSON lines, summary and log under $OUT (else runs/gpu-check).
#   bash experiments/gpu/run.sh [check.py options, e.g. --stages train,decode --budget 200]
set -o pipefail
out="${OUT:-runs/gpu-check}"
mkdir -p "$out"
nvidia-smi -L 2>&1 | tee "$out/log.txt"
PYTHONUNBUFFERED=1 timeout 520 "${PYTHON:-python3}" experiments/gpu/check.py --out "$out" "$@" 2>&1 | tee -a "$out/log.txt"
