#!/usr/bin/env bash
# The full preset's models on one GPU: random-initialised real architectures at batch sizes
# 1/8/32/64 (see bench/gpu.py). Budget: < 8 minutes on one data-centre GPU.
#   bench/gpu.sh                 # --device cuda
#   bench/gpu.sh --quick         # CPU smoke run (no GPU needed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if [ "${1:-}" = "--quick" ]; then
  exec timeout 600 "$PY" bench/gpu.py "$@"
fi
exec timeout 480 "$PY" bench/gpu.py --device cuda "$@"
