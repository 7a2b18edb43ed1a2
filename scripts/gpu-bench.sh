#!/usr/bin/env bash
# GPU checks and measurements for README's performance section, as one command of under ten minutes
# on a lent GPU machine (no Rust there, no network), in order of what matters most if time runs out:
#  1. a smoke test (the binary finds the driver and libcublas/libcurand/libcudart), then CUDA
#     against the CPU: `it::gpu` in the integration-test binary (dense and quantized bases);
#  2. issue 13's table on the GPU: the Llama-3.2-1B shape's LoRA train step at batch 8 x 512 with an
#     f32, a bf16 and a quantized (q4_0, nf4) base, with and without gradient checkpointing: peak GPU
#     memory and tokens/s;
#  3. the train step beside PyTorch + PEFT (SDPA attention) on the same GPU in bf16 for the
#     SmolLM2-135M and 1B shapes, and forward scoring;
#  4. the whole product on the GPU: the shipped support-chat recipe (bf16 training, the domain suite
#     on base and adapted model), a merged export computed on the GPU, and `eval` of it.
#
#   scripts/gpu-bench.sh PACKED_DIR [OUT_DIR]     # PACKED_DIR from scripts/gpu-pack.sh: .gpu
#   scripts/gpu-bench.sh --bin FEINSCHLIFF [--tests TEST_BINARY] [OUT_DIR]   # binaries as they are
#
# OUT_DIR defaults to $OUT (the device tool's) or the current folder. It gets the log, gpu-bench.txt,
# and the reports of step 4 (its runs are written to a temporary folder: the device tool brings
# back eight files at most).
# GPU_BENCH_SECONDS (default 540) bounds the whole run: a step that would start later is skipped.
# PyTorch, transformers and peft must be importable by python3 (they are on the lent H100/H200s).
set -uo pipefail
bin="" tests=""
case "${1:-}" in
  --bin)
    bin="${2:?--bin FEINSCHLIFF}"; shift 2
    if [ "${1:-}" = "--tests" ]; then tests="${2:?--tests TEST_BINARY}"; shift 2; fi
    ;;
  "" | -*) echo "usage: scripts/gpu-bench.sh PACKED_DIR [OUT_DIR] | --bin BIN [--tests TESTS] [OUT_DIR]" >&2; exit 2 ;;
  *)
    packed="$1"; shift
    unpacked="$(mktemp -d)"
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter="tar")' \
      "$packed/binaries.tar.xz" "$unpacked" || exit 1
    bin="$unpacked/feinschliff" tests="$unpacked/tests"
    ;;
esac
out="${1:-${OUT:-.}}"
mkdir -p "$out"
log="$out/gpu-bench.txt"
work="$(mktemp -d)"
budget="${GPU_BENCH_SECONDS:-540}"

# The binaries link libcublas.so.13, libcurand.so.10 and libcudart.so.13 (and the driver's
# libcuda.so.1, which is on the loader's path): find them in the toolkit or among the Python
# packages PyTorch brings (nvidia/cu13/lib).
libs=$(python3 - <<'PY'
import glob, os, site
names = ["libcublas.so.13", "libcurand.so.10", "libcudart.so.13"]
roots = ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"] + site.getsitepackages()
found = []
for name in names:
    for root in roots:
        hits = sorted(glob.glob(os.path.join(root, "**", name), recursive=True))
        if hits:
            folder = os.path.dirname(hits[0])
            if folder not in found:
                found.append(folder)
            break
print(":".join(found))
PY
)
export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# Runs one step unless the budget is spent, with at most 240 s or what is left of the budget.
step() {
  local left=$((budget - SECONDS))
  if [ "$left" -lt 20 ]; then echo "SKIPPED (out of time): $*"; return; fi
  echo "+ [${SECONDS}s] $*"
  timeout $((left < 240 ? left : 240)) "$@" || echo "FAILED ($?): $*"
}
train() { step "$bin" bench train --batch 8 --seq 512 --device cuda:0 "$@"; }

{
  date -u +"%Y-%m-%d %H:%M UTC"
  [ -f "${packed:-}/COMMIT" ] && echo "commit $(cat "$packed/COMMIT")"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  echo "CUDA libraries from: ${libs:-none found}"

  step "$bin" bench train --size tiny --steps 3 --device cuda:0
  if [ -n "$tests" ]; then step "$tests" it::gpu --nocapture --test-threads 1; fi

  for args in "--dtype f32" "--dtype bf16" "--dtype bf16 --quantize q4_0" "--dtype bf16 --quantize nf4"; do
    # shellcheck disable=SC2086 # $args is several flags
    train --size llama-1b --steps 3 $args
    # shellcheck disable=SC2086
    train --size llama-1b --steps 3 $args --gradient-checkpointing
  done

  for shape in smol llama-1b; do
    step python3 scripts/torch_lora_reference.py --shape "$shape" --batch 8 --seq 512 --dtype bf16 \
      --steps 5 --device cuda
  done
  train --size smol --steps 10 --dtype bf16
  step "$bin" bench score --size llama-1b --batch 8 --seq 512 --dtype bf16 --steps 10 --device cuda:0
  step python3 scripts/torch_lora_reference.py --mode score --shape llama-1b --batch 8 --seq 512 \
    --dtype bf16 --steps 10 --device cuda

  step "$bin" model new --arch qwen2 --size tiny --seed 0 --out models/tiny-qwen2 --force
  step "$bin" train recipes/support-chat.toml --set train.device=cuda:0 --set model.dtype=bf16 \
    --set output.dir="$work/support-chat" --force
  step "$bin" export --adapter "$work/support-chat" --base models/tiny-qwen2 --merge --device cuda:0 \
    --out "$work/merged" --force
  step "$bin" eval --model "$work/merged" --suite evals/domain.toml --limit 20 --device cuda:0 \
    --baseline "$work/support-chat/eval/domain/base_results.json" --out "$work/eval-merged" --force
  for report in support-chat/eval/domain/report.md eval-merged/report.md; do
    [ -f "$work/$report" ] && cp "$work/$report" "$out/$(dirname "$report" | tr / -).md"
  done
  echo "done in ${SECONDS}s"
} 2>&1 | tee "$log"
