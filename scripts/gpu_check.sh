#!/usr/bin/env bash
# The GPU check in one command: CUDA tests, one short bf16 training run per paper
# model, the Toeplitz cost constant, batched same-shaped layers, the bf16 benchmark;
# everything under one folder (see scripts/gpu_check.py).
#   scripts/gpu_check.sh [--out DIR] [--dry-run] [--stages tests train toeplitz batching benchmark] [--budget SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
exec python scripts/gpu_check.py "$@"
