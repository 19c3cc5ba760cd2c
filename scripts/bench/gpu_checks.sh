#!/usr/bin/env bash
# What only a GPU can show, in one short run (about 5 minutes on one H100): the fused CUDA block kernels of ring
# attention against the math kernel, then MFU of gpt2_small training at 1024 and 8192 tokens (bf16).
#   bash scripts/bench/gpu_checks.sh [out_dir]
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${1:-gpu_checks}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python -m pytest -q -n 0 -p no:cacheprovider tests/unit/test_block_kernels.py 2>&1 | tee "$out/kernels.txt"
python scripts/bench/mfu.py --model gpt2_small --seq 1024 --batch 16 --steps 15 --warmup 5 --device cuda \
  --json "$out/mfu_1024.json" 2>&1 | tee "$out/mfu_1024.txt"
python scripts/bench/mfu.py --model gpt2_small --seq 8192 --batch 2 --steps 15 --warmup 5 --device cuda \
  --json "$out/mfu_8192.json" 2>&1 | tee "$out/mfu_8192.txt"
