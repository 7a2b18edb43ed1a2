//! The numerical kernels of a LoRA step, as candle ops with their own backward passes: the frozen
//! and LoRA projections with their fast CPU products (faer, AMX tiles, AVX512_BF16), attention,
//! the LM-head loss, fused norms and activations, and gradient checkpointing. They know no model:
//! nothing here imports from the rest of `model`, which builds its decoder on them.

pub mod amx;
pub mod avx512_bf16;
pub mod blocks;
pub mod checkpoint;
pub mod cpu_paths;
pub(crate) mod cpu_slices;
pub mod cross_entropy;
pub mod elements;
pub mod frozen_weight;
pub mod lora_linear;
mod low_rank;
pub mod matmul;
pub mod phases;
pub(crate) mod precomputed;
pub mod projection_weight;
pub mod quant;
pub mod rms_norm;
pub mod sdpa;
mod sdpa_cpu;
pub(crate) mod softcap;
pub(crate) mod swiglu;
pub mod vector_math;

use candle_core::DType;

/// The dtype reductions (norms, softmax, logits) run in: f32, or f64 for an f64 model.
pub fn accumulation_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
