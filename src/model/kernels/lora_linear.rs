//! A frozen projection with its LoRA adapter as one op: y = x·Wᵀ + s·((x⊙M)·Aᵀ)·Bᵀ, with M the
//! dropout mask (or none). Composed from candle ops, the adapter leaves three [tokens, out]
//! intermediates per projection alive until the backward pass (W·x, B·A·x, its scaled copy); here
//! the forward runs on the backend's storages and keeps only its inputs and the small [tokens, r]
//! product x·Aᵀ, which the backward needs again. The adapter's factors, gradients and products
//! are in its own dtype (f32 for a bf16 base) whatever the frozen weight's (dense or quantized,
//! see [`ProjectionWeight`]), except where the CPU's bf16 kernel runs a bf16 base: there x·Aᵀ
//! and its update, and g·B with its update, ride in the frozen product's pass on bf16 operands
//! ([`super::low_rank`]), as PyTorch's autocast computes them.

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::op::{BackpropOp, Mul};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};

use super::matmul::{matmul, product_transposed, MatmulStorage};
use super::phases::{timed, Phase};
use super::projection_weight::ProjectionWeight;

/// x [n, in] through W [out, in] plus the adapter A [r, in], B [out, r] scaled by `scale`, with
/// the dropout `mask` ([n, in], in the adapter's dtype) applied to the adapter's input.
/// Gradients flow to x, A and B; W is frozen.
pub fn lora_linear(
    x: &Tensor,
    weight: &ProjectionWeight,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let op = LoraLinear {
        weight: weight.clone(),
        scale,
        mask: mask.cloned(),
        rank: a.dim(0)?,
        saved_xa: OnceLock::new(),
    };
    if x.track_op() || a.track_op() || b.track_op() {
        x.apply_op3(a, b, op)
    } else {
        x.apply_op3_no_bwd(a, b, &op)
    }
}

struct LoraLinear {
    weight: ProjectionWeight,
    scale: f64,
    mask: Option<Tensor>,
    rank: usize,
    /// (x⊙M)·Aᵀ [n, r] from the forward pass, for the backward (which otherwise recomputes it).
    saved_xa: OnceLock<Tensor>,
}

/// The forward pass on one backend's storages, given the frozen product x·Wᵀ: y and (x⊙M)·Aᵀ.
fn forward<S: MatmulStorage>(
    (base, shape): (S, Shape),
    (x, lx): (&S, &Layout),
    (a, la): (&S, &Layout),
    (b, lb): (&S, &Layout),
    mask: Option<(&S, &Layout)>,
    scale: f64,
) -> Result<((S, Shape), (S, Shape))> {
    let lora_dtype = a.dtype();
    let converted;
    let (x_lora, lx_lora) = if x.dtype() == lora_dtype {
        (x, lx.clone())
    } else {
        converted = x.to_dtype(lx, lora_dtype)?;
        (&converted, Layout::contiguous(lx.shape()))
    };
    let dropped;
    let (x_lora, lx_lora) = match mask {
        Some((m, lm)) => {
            dropped = x_lora.binary_impl::<Mul>(m, &lx_lora, lm)?;
            (&dropped, Layout::contiguous(lx.shape()))
        }
        None => (x_lora, lx_lora),
    };
    let (xa, xa_shape) = product_transposed(x_lora, &lx_lora, a, la)?;
    let y = base.plus_product(
        &shape,
        (&xa, &Layout::contiguous(xa_shape.clone())),
        (b, &lb.transpose(0, 1)?),
        scale,
    )?;
    Ok(((y, shape), (xa, xa_shape)))
}

/// The dropout mask's storage as `S` (None without dropout), with its layout, for [`forward`].
macro_rules! with_mask {
    ($self:ident, $variant:ident, |$m:ident| $body:expr) => {{
        let mask_guard = $self.mask.as_ref().map(|m| m.storage_and_layout());
        let $m = match &mask_guard {
            Some((g, lm)) => match &**g {
                Storage::$variant(s) => Some((s, *lm)),
                _ => candle_core::bail!("LoRA linear: the dropout mask is on another device"),
            },
            None => None,
        };
        $body
    }};
}

/// The op's forward pass on one backend (`Cpu`, `Cuda`) with the frozen product `$frozen`: the
/// frozen product timed as a projection, the adapter's products as the adapter's, x·Aᵀ kept.
macro_rules! lora_forward {
    ($self:ident, $variant:ident, $frozen:ident, ($x:ident, $lx:ident), $a:expr, $b:expr) => {
        timed(Phase::Projections, $self.frozen_flops($lx), || {
            let base = $self.weight.$frozen($x, $lx)?;
            timed(Phase::Adapters, $self.adapter_flops($lx, 2), || {
                let (y, xa) = with_mask!($self, $variant, |m| forward(
                    base,
                    ($x, $lx),
                    $a,
                    $b,
                    m,
                    $self.scale
                ))?;
                $self.save_xa(Storage::$variant(xa.0), xa.1);
                Ok(y)
            })
        })
    };
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        a: &CpuStorage,
        la: &Layout,
        b: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        if self.fused(x.dtype(), a.dtype(), lx.dims()[0]) {
            let (frozen, adapter) = (self.frozen_flops(lx), self.adapter_flops(lx, 2));
            let fused = timed(Phase::Projections, frozen + adapter, || {
                // Under dropout the adapter multiplies x⊙M, the frozen product x.
                let dropped = with_mask!(self, Cpu, |m| m
                    .map(|(m, lm)| x.binary_impl::<Mul>(m, lx, lm))
                    .transpose())?;
                let contiguous = Layout::contiguous(lx.shape());
                let dropped = dropped.as_ref().map(|d| (d, &contiguous));
                self.weight
                    .cpu_forward_low_rank((x, lx), (a, la), (b, lb), self.scale, dropped)
            })?;
            if let Some(((y, y_shape), (xa, xa_shape))) = fused {
                self.save_xa(Storage::Cpu(CpuStorage::F32(xa)), xa_shape);
                return Ok((CpuStorage::F32(y), y_shape));
            }
        }
        lora_forward!(self, Cpu, cpu_forward, (x, lx), (a, la), (b, lb))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
        a: &candle_core::CudaStorage,
        la: &Layout,
        b: &candle_core::CudaStorage,
        lb: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        lora_forward!(self, Cuda, cuda_forward, (x, lx), (a, la), (b, lb))
    }

    /// dx = g·W + ((s·g·B)·A)⊙M, dA = (s·g·B)ᵀ·(x⊙M), dB = s·gᵀ·((x⊙M)·Aᵀ).
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        timed(Phase::Projections, self.frozen_flops(x.layout()), || {
            self.backward(x, a, b, grad)
        })
    }
}

impl LoraLinear {
    /// Whether the adapter's products ride in the frozen ones on the CPU's bf16 kernel
    /// ([`ProjectionWeight::cpu_forward_low_rank`]) for x of `x_dtype` on `rows` rows and factors
    /// of `lora_dtype`: a bf16 compute dtype, f32 activations and factors.
    fn fused(&self, x_dtype: DType, lora_dtype: DType, rows: usize) -> bool {
        x_dtype == DType::F32 && lora_dtype == DType::F32 && self.weight.fuses_adapter(rows)
    }

    /// Keeps x·Aᵀ of the forward pass for [`Self::backward`].
    fn save_xa(&self, xa: Storage, shape: Shape) {
        // Each forward pass makes its own op, so the cell is empty here.
        let _ = self
            .saved_xa
            .set(Tensor::from_storage(xa, shape, BackpropOp::none(), false));
    }

    /// Multiply-adds × 2 of the frozen product for x [n, in].
    fn frozen_flops(&self, lx: &Layout) -> usize {
        2 * lx.dims()[0] * lx.dims()[1] * self.weight.dims().0
    }

    /// Floating-point operations of `products` products of the adapter's size (n·r·(in + out)
    /// each) for x [n, in].
    fn adapter_flops(&self, lx: &Layout, products: usize) -> usize {
        let (n, inp) = (lx.dims()[0], lx.dims()[1]);
        products * n * self.rank * (inp + self.weight.dims().0)
    }

    /// The gradients of x, A and B (see [`CustomOp3::bwd`] above).
    fn backward(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached, so that the gradients carry no graph of their own into the optimizer.
        let (a, b) = (a.detach(), b.detach());
        let lora_dtype = a.dtype();
        let mut x_lora = x.detach().to_dtype(lora_dtype)?;
        if let Some(m) = &self.mask {
            x_lora = x_lora.mul(m)?;
        }
        let g = grad.detach().to_dtype(lora_dtype)?;
        let xa = || match self.saved_xa.get() {
            Some(xa) => Ok(xa.clone()),
            None => matmul(&x_lora, &a.t()?),
        };
        // On the CPU's bf16 kernel, dx = g·W + s·(g·B)·A is one pass that also gives g·B; under
        // dropout the pass gives g·W and g·B, and the masked update is summed apart.
        if x.track_op() && self.fused(grad.dtype(), lora_dtype, grad.dim(0)?) {
            let flops = self.adapter_flops(x.layout(), 2);
            let with_update = self.mask.is_none();
            if let Some((dx, g_b)) = timed(Phase::Projections, flops, || {
                self.weight
                    .times_plus_low_rank(&grad.detach(), (&a, &b), self.scale, with_update)
            })? {
                let (dx, da, db) =
                    timed(Phase::Adapters, self.adapter_flops(x.layout(), 2), || {
                        let g_b = (g_b * self.scale)?;
                        let dx = match &self.mask {
                            Some(m) => (dx + matmul(&g_b, &a)?.mul(m)?)?,
                            None => dx,
                        };
                        let da = matmul(&g_b.t()?, &x_lora)?;
                        let db = (matmul(&g.t()?, &xa()?)? * self.scale)?;
                        Result::Ok((dx, da, db))
                    })?;
                return Ok((Some(dx.to_dtype(x.dtype())?), Some(da), Some(db)));
            }
        }
        // The adapter's share of dx is summed into the frozen product's buffer below, and
        // counted with it.
        let (g_b, da, db) = timed(Phase::Adapters, self.adapter_flops(x.layout(), 4), || {
            let g_b = (matmul(&g, &b)? * self.scale)?;
            let da = matmul(&g_b.t()?, &x_lora)?;
            let db = (matmul(&g.t()?, &xa()?)? * self.scale)?;
            Result::Ok((g_b, da, db))
        })?;
        let dx = match (&self.mask, x.track_op()) {
            (_, false) => None,
            (Some(m), true) => {
                let dx_lora = matmul(&g_b, &a)?.mul(m)?;
                Some((self.weight.times(&grad.detach())? + dx_lora.to_dtype(x.dtype())?)?)
            }
            (None, true) => Some(
                self.weight
                    .times_plus(&grad.detach(), (&g_b, &a), 1.0)?
                    .to_dtype(x.dtype())?,
            ),
        };
        Ok((dx, Some(da), Some(db)))
    }
}
