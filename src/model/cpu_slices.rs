//! Borrowing CPU tensors' elements as plain slices, for the fused kernels that work on them
//! directly (attention, SwiGLU, RoPE).

use candle_core::{Result, Storage, Tensor, WithDType};

/// Calls `f` with the contiguous elements of each CPU tensor, in order.
pub(crate) fn with_cpu_slices<T: WithDType, R, const N: usize>(
    tensors: [&Tensor; N],
    f: impl FnOnce([&[T]; N]) -> R,
) -> Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(N);
    for (storage, layout) in &guards {
        let Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("a CPU kernel got a tensor on another device");
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("a CPU kernel got a non-contiguous tensor");
        };
        slices.push(&cpu.as_slice::<T>()?[start..end]);
    }
    match slices.try_into() {
        Ok(slices) => Ok(f(slices)),
        Err(_) => candle_core::bail!("a CPU kernel got the wrong number of tensors"),
    }
}
