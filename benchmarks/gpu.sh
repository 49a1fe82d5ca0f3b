#!/usr/bin/env bash
# Step time (and peak memory) of LoRA vs full fine-tuning vs frozen base on one CUDA GPU, bf16,
# hidden 4096, local Megatron layers (no Transformer Engine): the GPU counterpart of the CPU
# benchmarks.
#
# How to run it on a lent H200 (the device tool; its image has Python 3.12 and torch 2.11 with
# CUDA, but no megatron-core and no network, so the wheel travels in the git-ignored wheels/):
#
#   once, here, in the repo root:
#     python -m pip download megatron-core==0.19.2 --no-deps --python-version 3.12 \
#         --only-binary=:all: -d wheels/
#   then the device tool's run with:
#     command:   bash benchmarks/gpu.sh
#     carry:     ["wheels"]
#     timeout_s: 480
#
# What comes back under $OUT: gpu_step_time.{txt,json}, gpu_peak_memory.{txt,json}, gpu.txt.
# megatron-core 0.19.2 needs only torch, numpy and packaging (all on that image); this path
# imports no apex and no TE. megatron_cpu.device is never switched on: it is a no-op with CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}

wheel=$(ls wheels/megatron_core-*-cp312-*.whl 2>/dev/null | head -1 || true)
if ! "$PY" -c "import megatron.core" 2>/dev/null; then
    if [ -z "$wheel" ]; then
        echo "no megatron-core here and no wheels/megatron_core-*-cp312-*.whl to install" >&2
        exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/mcore "$wheel"
    export PYTHONPATH=/tmp/mcore
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$PY" -c "import torch, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'megatron-core', m.__version__)"
} | tee "$OUT/gpu.txt"

# 4 layers, 4096 tokens (seq 2048 x batch 2): about 50 ms per full fine-tuning step on an H200.
timeout 300 "$PY" -m benchmarks.step_time --device cuda --dtype bf16 --hidden 4096 \
    --r 8 16 64 --layouts 1 --layers 4 --seq 2048 --batch 2 --rounds 9 --steps 3 \
    --json "$OUT/gpu_step_time.json" | tee "$OUT/gpu_step_time.txt"

timeout 150 "$PY" -m benchmarks.peak_memory --device cuda --hidden 4096 --r 16 --layers 4 \
    --seq 2048 --batch 2 --dtype bf16 --json "$OUT/gpu_peak_memory.json" | tee "$OUT/gpu_peak_memory.txt"
