//! A frozen base projection (y = x·Wᵀ + b) with an optional LoRA adapter.
//!
//! candle's matmul backward always computes the weight gradient, even for a frozen weight; for a
//! LoRA step that is a third of the work wasted. [`frozen_matmul`] is a custom op that runs the
//! fast product of [`super::kernels::matmul`] forward (with a dense weight packed once, see
//! [`super::kernels::frozen_weight::FrozenWeight`]; a quantized one decoded in panels, see [`ProjectionWeight`]) and whose
//! backward returns only the input gradient.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::kernels::phases::{timed, Phase};
use super::kernels::projection_weight::ProjectionWeight;
use super::lora::{LoraAdapter, Pass};

/// One linear layer of the base model; the base weight never trains.
#[derive(Clone)]
pub struct Linear {
    /// [out_features, in_features], as stored in the checkpoint (or quantized).
    pub weight: ProjectionWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: ProjectionWeight, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims().1
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims().0
    }

    /// Applies the layer to x of shape [..., in] (rows [n, in] need no reshape, which in candle's
    /// backward costs a copy of the gradient).
    pub fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        if x.rank() != 2 {
            let mut out_dims = x.dims().to_vec();
            let in_features = out_dims.pop().unwrap_or(0);
            out_dims.push(self.out_features());
            let y = self.forward(&x.reshape(((), in_features))?, pass)?;
            return Ok(y.reshape(out_dims)?);
        }
        let mut y = match &self.lora {
            Some(lora) => lora.apply(x, &self.weight, pass)?,
            None => frozen_matmul(x, &self.weight)?,
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        Ok(y)
    }
}

/// x·Wᵀ for x [n, in] and a frozen W [out, in]; gradients flow to x only.
pub fn frozen_matmul(x: &Tensor, weight: &ProjectionWeight) -> Result<Tensor> {
    let op = InputGradOnly(weight.clone());
    if x.track_op() {
        Ok(x.apply_op1(op)?)
    } else {
        Ok(x.apply_op1_no_bwd(&op)?)
    }
}

/// Forward: x·Wᵀ. Backward: dL/dx = dL/dy · W, nothing for W.
struct InputGradOnly(ProjectionWeight);

impl InputGradOnly {
    /// Multiply-adds × 2 of x [n, in] · Wᵀ.
    fn flops(&self, lx: &Layout) -> usize {
        2 * lx.shape().elem_count() * self.0.dims().0
    }
}

impl CustomOp1 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, x: &CpuStorage, lx: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        timed(Phase::Projections, self.flops(lx), || {
            self.0.cpu_forward(x, lx)
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        timed(Phase::Projections, self.flops(lx), || {
            self.0.cuda_forward(x, lx)
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let flops = 2 * grad.elem_count() * self.0.dims().1;
        let dx = timed(Phase::Projections, flops, || self.0.times(&grad.detach()))?;
        Ok(Some(dx))
    }
}
