#!/usr/bin/env bash
# GPU check for one CUDA machine, under 8 minutes: scoring throughput, its
# ratio to the pure forward pass and to a DataLoader loop, and DDP training
# on one worker under bfloat16 autocast. Run from a fresh clone:
#
#   python3 -m venv .venv && .venv/bin/pip install -e . && bash bench/gpu_check.sh
#
# It writes a 50,000-image synthetic pool under $DISTAL_GPU_CHECK_DIR
# (default /tmp/distal-gpu-check) and prints BENCH lines; paste them into
# docs/benchmarks.md with the machine line.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-.venv/bin/python}
work=${DISTAL_GPU_CHECK_DIR:-/tmp/distal-gpu-check}
pool="$work/synth-50000"

"$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else "bench/gpu_check.sh: no CUDA device is visible to torch")'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
cpus=$(nproc)

if [ ! -f "$pool/_distal_pool.json" ]; then
    timeout 120 "$python" -m distal.cli pool synth --out "$pool" --rows 50000 --image-size 32 --overwrite
fi
# The model gets a quarter of the CPUs for its thread pool; the rest decode.
threads=$(( cpus / 4 > 0 ? cpus / 4 : 1 ))
loaders=$(( cpus - threads > 0 ? cpus - threads : 1 ))
timeout 210 "$python" bench/scoring.py --pool "$pool" --width 64 --batch-size 512 \
    --threads "$threads" --loader-workers "$loaders" --forward-rows 20000
timeout 120 "$python" bench/training.py --pool "$pool" --labeled 10000 --epochs 2 --width 64 \
    --batch-size 128 --workers 1 --bf16
