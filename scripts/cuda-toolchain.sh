#!/usr/bin/env bash
# Installs a CUDA 13.2 build toolchain from PyPI wheels into a local folder (no system CUDA needed)
# and prints the environment to build Feinschliff's CUDA binary with it:
#
#   scripts/cuda-toolchain.sh [DIR]            # default DIR: .cuda-toolchain (git-ignored)
#   eval "$(scripts/cuda-toolchain.sh --env [DIR])"
#   cargo build --features cuda
#
# candle-kernels needs nvcc and the CUDA headers at build time; at run time the binary loads
# libcuda.so.1 (the driver, >= 580 for CUDA 13) and libcublas/libcurand/libcudart from the same
# folder (LD_LIBRARY_PATH). On a machine with the CUDA toolkit installed, skip this script:
# `CUDA_COMPUTE_CAP=90 cargo build --features cuda` is enough.
set -euo pipefail

print_env=0
if [ "${1:-}" = "--env" ]; then print_env=1; shift; fi
dir="$(realpath -m "${1:-.cuda-toolchain}")"
cuda="$dir/nvidia/cu13"

if [ "$print_env" = 0 ]; then
  python3 -m pip install --quiet --no-deps --target "$dir" \
    "nvidia-cuda-nvcc==13.2.*" "nvidia-cuda-runtime==13.2.*" "nvidia-cuda-crt==13.2.*" "nvidia-nvvm==13.2.*" \
    "nvidia-cuda-cccl==13.2.*" "nvidia-cuda-nvrtc==13.2.*" "nvidia-cublas==13.*" "nvidia-curand==10.*"
  # The wheels ship versioned libraries only; the linker wants the unversioned names.
  for lib in "$cuda"/lib/lib*.so.*; do
    base="${lib%%.so.*}.so"
    [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
  done
  # Linking needs libcuda.so; on a build machine without a driver a stub stands in, exporting every
  # driver-API name cuda.h mentions (the real driver, libcuda.so.1, is loaded at run time).
  if ! ldconfig -p | grep -q 'libcuda.so.1'; then
    mkdir -p "$dir/stub"
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$cuda/include/cuda.h" | sort -u | sed 's/.*/void &(void) {}/' > "$dir/stub/stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$dir/stub/libcuda.so" "$dir/stub/stub.c"
  fi
  echo "CUDA toolchain in $dir; now run: eval \"\$($0 --env $dir)\" && cargo build --features cuda" >&2
fi

cat <<ENV
export CUDA_HOME="$cuda"
export CUDA_PATH="$cuda"
export PATH="$cuda/bin:\$PATH"
export LIBRARY_PATH="$cuda/lib:$dir/stub:\${LIBRARY_PATH:-}"
export LD_LIBRARY_PATH="$cuda/lib:\${LD_LIBRARY_PATH:-}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
