//! Borrowing CPU tensors' elements as plain slices, for the fused kernels that work on them
//! directly (attention, SwiGLU, RoPE).

use candle_core::{Layout, Result, Storage, Tensor, WithDType};

/// The elements of `data` (a CPU storage's) that a contiguous `layout` covers.
pub(crate) fn contiguous<'a, T>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("a CPU kernel got a non-contiguous tensor"),
    }
}

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
        slices.push(contiguous(cpu.as_slice::<T>()?, layout)?);
    }
    match slices.try_into() {
        Ok(slices) => Ok(f(slices)),
        Err(_) => candle_core::bail!("a CPU kernel got the wrong number of tensors"),
    }
}
