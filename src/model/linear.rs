//! A frozen base projection (y = x·Wᵀ + b) with an optional LoRA adapter.
//!
//! candle's matmul backward always computes the weight gradient, even for a frozen weight; for a
//! LoRA step that is a third of the work wasted. [`frozen_matmul`] is a custom op that runs the
//! fast product of [`super::kernels::matmul`] forward (with the weight packed once, see
//! [`FrozenWeight`]) and whose backward returns only the input gradient.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use super::kernels::frozen_weight::FrozenWeight;
use super::kernels::matmul::product_transposed;
use super::kernels::phases::{timed, Phase};
use super::lora::{LoraAdapter, Pass};

/// One linear layer of the base model; the base weight never trains.
#[derive(Clone)]
pub struct Linear {
    /// [out_features, in_features], as stored in the checkpoint.
    pub weight: FrozenWeight,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraAdapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: FrozenWeight::new(weight),
            bias,
            lora: None,
        }
    }

    pub fn in_features(&self) -> usize {
        self.weight.tensor().dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.tensor().dims()[0]
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
pub fn frozen_matmul(x: &Tensor, weight: &FrozenWeight) -> Result<Tensor> {
    let op = InputGradOnly(weight.clone());
    if x.track_op() {
        Ok(x.apply_op2(weight.tensor(), op)?)
    } else {
        Ok(x.apply_op2_no_bwd(weight.tensor(), &op)?)
    }
}

/// Multiply-adds × 2 of x [n, in] · Wᵀ for W [out, in].
fn flops(lx: &Layout, lw: &Layout) -> usize {
    2 * lx.shape().elem_count() * lw.dims()[0]
}

/// Forward: x·Wᵀ. Backward: dL/dx = dL/dy · W, nothing for W.
struct InputGradOnly(FrozenWeight);

impl CustomOp2 for InputGradOnly {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        timed(Phase::Projections, flops(lx, lw), || {
            match self.0.cpu_transposed_product((x, lx), (w, lw))? {
                Some(product) => Ok(product),
                None => product_transposed(x, lx, w, lw),
            }
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        timed(Phase::Projections, flops(lx, lw), || {
            product_transposed(x, lx, w, lw)
        })
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let flops = 2 * grad.elem_count() * weight.dim(1)?;
        let dx = timed(Phase::Projections, flops, || self.0.times(&grad.detach()))?;
        Ok((Some(dx), None))
    }
}
