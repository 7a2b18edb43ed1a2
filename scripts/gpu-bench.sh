#!/usr/bin/env bash
# GPU measurements for README's performance section: Feinschliff's LoRA train step beside
# PyTorch + PEFT (SDPA attention) on the same GPU, SmolLM2-135M and Llama-3.2-1B shapes,
# batch 8 x 512, bf16. Run on the GPU machine from the repository root with the CUDA binary built
# here (see scripts/cuda-toolchain.sh) and carried along:
#
#   scripts/gpu-bench.sh target/release/feinschliff [OUT_DIR]
#
# PyTorch, transformers and peft must be importable there (they are on the lent H100/H200s).
set -uo pipefail
bin="${1:?usage: scripts/gpu-bench.sh FEINSCHLIFF_CUDA_BINARY [OUT_DIR]}"
out="${2:-${OUT:-.}}"
mkdir -p "$out"
log="$out/gpu-bench.txt"
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  for shape in smol llama-1b; do
    "$bin" bench train --size "$shape" --batch 8 --seq 512 --dtype bf16 --steps 10 --device cuda:0
    python3 scripts/torch_lora_reference.py --shape "$shape" --batch 8 --seq 512 --dtype bf16 --steps 10 --device cuda
  done
} 2>&1 | tee "$log"
