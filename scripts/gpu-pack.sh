#!/usr/bin/env bash
# Builds Feinschliff's CUDA binaries on this (GPU-less) machine and packs them for a lent GPU
# machine, which receives the working tree and whatever `carry` names, 64 MiB in all, and has no
# Rust toolchain and no registry: the command-line binary and the integration-test binary (for
# `it::gpu`), stripped and packed as one xz-compressed tar in .gpu/ (git-ignored). The two share
# most of their code, so one stream with a dictionary larger than either compresses them to 30 MiB
# (49 MiB compressed apart; 285 MiB stripped).
#
#   scripts/cuda-toolchain.sh          # once per machine: nvcc and the CUDA libraries from PyPI
#   scripts/gpu-pack.sh                # 24 min from clean on 2 cores, then about 5
#   # the device tool: run(command="scripts/gpu-bench.sh .gpu", carry=[".gpu"], timeout_s=600)
#
# The build uses the one dev profile (optimised) with its own target folder, CARGO_TARGET_DIR
# (default target/cuda), so that it never invalidates the CPU build's.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target/cuda}"
eval "$(scripts/cuda-toolchain.sh --env)"
if ! command -v nvcc >/dev/null; then
  echo "gpu-pack: no nvcc; run scripts/cuda-toolchain.sh first" >&2
  exit 1
fi

# The test binary's path is only in cargo's JSON messages.
tests=$(cargo test --features cuda --no-run --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "main" and m.get("executable"):
        print(m["executable"])
')
bin="$CARGO_TARGET_DIR/debug/feinschliff"
[ -x "$bin" ] && [ -x "$tests" ] || { echo "gpu-pack: the build left no binaries" >&2; exit 1; }

rm -rf .gpu.tmp && mkdir -p .gpu.tmp/binaries
strip -o .gpu.tmp/binaries/feinschliff "$bin"
strip -o .gpu.tmp/binaries/tests "$tests"
tar -C .gpu.tmp/binaries -cf - feinschliff tests | xz -T1 --lzma2=preset=9,dict=384MiB > .gpu.tmp/binaries.tar.xz
rm -r .gpu.tmp/binaries
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo ' with uncommitted changes')" > .gpu.tmp/COMMIT
rm -rf .gpu && mv .gpu.tmp .gpu

# What travels: the tracked and untracked-not-ignored files, and .gpu.
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- | tail -1 | cut -f1)
packed=$(du -cb .gpu | tail -1 | cut -f1)
total=$(((tree + packed) / 1048576))
ls -l .gpu
echo "gpu-pack: .gpu $((packed / 1048576)) MiB + working tree $((tree / 1048576)) MiB = $total MiB (limit 64)"
[ "$total" -lt 64 ] || { echo "gpu-pack: over the device tool's 64 MiB" >&2; exit 1; }
