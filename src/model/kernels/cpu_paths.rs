//! What the CPU kernels run on, in words: named in run logs and benchmark headers, so that a
//! figure says which path it is from.

use super::{amx, vector_math};

/// The vector instructions [`vector_math`]'s row kernels take, and what bf16 weights are
/// multiplied with: "AVX2+FMA, bf16 weights widened to f32".
pub fn describe() -> String {
    let bf16 = match amx::bf16_kernel() {
        Some(amx::Bf16Kernel::Amx) => "bf16 weights on AMX tiles",
        Some(amx::Bf16Kernel::Avx512Bf16) => "bf16 weights on AVX512_BF16",
        None => "bf16 weights widened to f32",
    };
    format!("{}, {bf16}", vector_math::instruction_set())
}
