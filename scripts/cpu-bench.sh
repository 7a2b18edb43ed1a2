#!/usr/bin/env bash
# The CPU figures of README's performance table, Feinschliff and the Python references side by
# side in one run (about 15 minutes on 2 cores; run it on an otherwise idle machine):
#  - LoRA train step (tiny and SmolLM2-135M shapes, f32; smol with a bf16 base, on AMX tiles where
#    the CPU has them, with the tiles off and the AVX512_BF16 kernel forced where the CPU has it, and
#    with both kernels off (bf16 widened to f32)) beside PyTorch + PEFT (bf16: autocast);
#  - the bf16 kernels alone (`bench kernels`: GFLOP/s on the smol projection shapes);
#  - forward scoring (f32, bf16) beside PyTorch under inference_mode;
#  - greedy generation with the KV cache (batch 1 and 8, 32-token prompts, 128 new tokens) beside
#    transformers' generate;
#  - Belebele-de (60 questions) on a random model of the smol shape beside lm-evaluation-harness'
#    HF backend (scripts/lm_eval_belebele_reference.sh; needs ../shared/benchmarks).
#
#   scripts/cpu-bench.sh target/debug/feinschliff [PYTHON] [OUT_DIR]
#
# PYTHON (default python3) must have torch, transformers, peft and lm_eval installed.
set -uo pipefail
bin="${1:?usage: scripts/cpu-bench.sh FEINSCHLIFF_BINARY [PYTHON] [OUT_DIR]}"
py="${2:-python3}"
out="${3:-runs/cpu-bench}"
mkdir -p "$out"
ref=scripts/torch_lora_reference.py
# The forced kernel variants run where the CPU has a bf16 kernel to force or to turn off. Without
# AVX512_BF16 or AMX, PyTorch's bf16 autocast computes without bf16 instructions (on an AMD EPYC
# with AVX2 alone, 240 s a smol train step): its references then time one step, not five.
amx=$(grep -o -w -m1 amx_bf16 /proc/cpuinfo)
avx512_bf16=$(grep -o -w -m1 avx512_bf16 /proc/cpuinfo)
torch_bf16_steps=5
[ -z "$amx$avx512_bf16" ] && torch_bf16_steps=1
step() { echo "+ $*"; timeout 900 "$@" 2>&1 | grep -E "tokens/s|s/step|wall|acc|bench|torch|real|FAILED|rror" || echo "FAILED: $*"; }
{
  date -u +"%Y-%m-%d %H:%M UTC"
  lscpu | grep -E "Model name|^CPU\(s\)"
  echo "CPU features: $(grep -o -w -E 'avx2|fma|avx512f|avx512_bf16|amx_bf16|amx_tile' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  "$bin" bench kernels
  step "$bin" bench train --size tiny --steps 40
  step "$py" "$ref" --shape tiny --steps 40
  step "$bin" bench train --size smol --steps 5
  step "$py" "$ref" --shape smol --steps 5
  step "$bin" bench train --size smol --steps 5 --dtype bf16
  if [ -n "$avx512_bf16" ]; then
    step env FEINSCHLIFF_AMX=0 FEINSCHLIFF_AVX512_BF16=1 "$bin" bench train --size smol --steps 5 --dtype bf16
  fi
  if [ -n "$amx$avx512_bf16" ]; then
    step env FEINSCHLIFF_AMX=0 FEINSCHLIFF_AVX512_BF16=0 "$bin" bench train --size smol --steps 5 --dtype bf16
  fi
  step "$py" "$ref" --shape smol --steps "$torch_bf16_steps" --dtype bf16
  step "$bin" bench score --size smol --steps 5
  step "$py" "$ref" --mode score --shape smol --steps 5
  step "$bin" bench score --size smol --steps 5 --dtype bf16
  step "$py" "$ref" --mode score --shape smol --steps "$torch_bf16_steps" --dtype bf16
  for batch in 1 8; do
    step "$bin" bench generate --size smol --seq 32 --batch "$batch" --new-tokens 128
    step "$py" "$ref" --mode generate --shape smol --prompt-len 32 --batch "$batch" --new-tokens 128 --steps 2
  done
  model="$out/smol-model"
  "$bin" model new --arch llama --size smol --seed 0 --out "$model" --force > /dev/null
  echo "+ feinschliff eval belebele_de --limit 60"
  /usr/bin/time -f "real %e s" "$bin" eval --model "$model" --suite evals/german.toml --tasks belebele_de \
    --limit 60 --out "$out/belebele" --force 2>&1 | grep -E "acc|peak|real"
  step env LM_EVAL_PYTHON="$py" scripts/lm_eval_belebele_reference.sh "$model" 60
} 2>&1 | tee "$out/cpu-bench.txt"
