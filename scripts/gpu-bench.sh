#!/usr/bin/env bash
# GPU checks and measurements for README's performance section, in one run of a few minutes:
#  1. (given a test binary) CUDA against the CPU: `tests/it/gpu.rs`, built here by
#     `cargo test --release --features cuda --no-run` (the path cargo prints for tests/main.rs).
#  2. Feinschliff's LoRA train step beside PyTorch + PEFT (SDPA attention) on the same GPU, for the
#     SmolLM2-135M and Llama-3.2-1B shapes at batch 8 x 512 in bf16: tokens/s and peak GPU memory;
#     the 1B shape once more with gradient checkpointing, and forward scoring.
#  3. The whole product on the GPU: the shipped support-chat recipe (bf16 training, the domain
#     suite on base and adapted model), a merged export computed on the GPU, and `eval` of it.
# Run on the GPU machine from the repository root with the CUDA binary built here (see
# scripts/cuda-toolchain.sh) and carried along:
#
#   scripts/gpu-bench.sh target/release/feinschliff [OUT_DIR [TEST_BINARY]]
#
# PyTorch, transformers and peft must be importable there (they are on the lent H100/H200s).
set -uo pipefail
bin="${1:?usage: scripts/gpu-bench.sh FEINSCHLIFF_CUDA_BINARY [OUT_DIR [TEST_BINARY]]}"
out="${2:-${OUT:-.}}"
tests="${3:-}"
mkdir -p "$out"
log="$out/gpu-bench.txt"
step() { echo "+ $*"; timeout 240 "$@" || echo "FAILED ($?): $*"; }
{
  date -u +"%Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  if [ -n "$tests" ]; then step "$tests" it::gpu --nocapture; fi
  for shape in smol llama-1b; do
    step "$bin" bench train --size "$shape" --batch 8 --seq 512 --dtype bf16 --steps 10 --device cuda:0
    step python3 scripts/torch_lora_reference.py --shape "$shape" --batch 8 --seq 512 --dtype bf16 --steps 10 --device cuda
  done
  step "$bin" bench train --size llama-1b --batch 8 --seq 512 --dtype bf16 --steps 5 --device cuda:0 --gradient-checkpointing
  step "$bin" bench score --size llama-1b --batch 8 --seq 512 --dtype bf16 --steps 10 --device cuda:0

  step "$bin" model new --arch qwen2 --size tiny --seed 0 --out models/tiny-qwen2 --force
  step "$bin" train recipes/support-chat.toml --set train.device=cuda:0 --set model.dtype=bf16 \
    --set output.dir="$out/support-chat" --force
  step "$bin" export --adapter "$out/support-chat" --base models/tiny-qwen2 --merge --device cuda:0 \
    --out "$out/merged" --force
  step "$bin" eval --model "$out/merged" --suite evals/domain.toml --limit 20 --device cuda:0 \
    --baseline "$out/support-chat/eval/domain/base_results.json" --out "$out/eval-merged" --force
} 2>&1 | tee "$log"
