//! A result computed outside candle's graph, handed to a custom op's forward so the op can attach
//! its own backward to it (blockwise attention, the LM head's loss). The forward must return a
//! storage of its own, so the tensor is copied once and then dropped, not kept by the graph.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, Result, Shape, Storage, Tensor};
use std::sync::Mutex;

pub(crate) struct Precomputed(Mutex<Option<Tensor>>);

impl Precomputed {
    pub(crate) fn new(tensor: Tensor) -> Self {
        Self(Mutex::new(Some(tensor)))
    }

    /// Takes the tensor (once), contiguous from offset 0.
    fn take(&self) -> Result<Tensor> {
        let taken = self
            .0
            .lock()
            .map_err(|_| candle_core::Error::Msg("precomputed result lock poisoned".into()))?
            .take();
        taken
            .ok_or_else(|| candle_core::Error::Msg("precomputed result taken twice".into()))?
            .contiguous()
    }

    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let tensor = self.take()?;
        let (storage, layout) = tensor.storage_and_layout();
        match (&*storage, layout.start_offset()) {
            (Storage::Cpu(s), 0) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("precomputed result is not a fresh CPU tensor"),
        }
    }

    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let tensor = self.take()?;
        let (storage, layout) = tensor.storage_and_layout();
        match (&*storage, layout.start_offset()) {
            (Storage::Cuda(s), 0) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("precomputed result is not a fresh CUDA tensor"),
        }
    }
}
