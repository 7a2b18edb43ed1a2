//! The frozen weight W [out, in] of a base projection: dense ([`FrozenWeight`], packed once for
//! the bf16 kernels) or quantized ([`QuantizedWeight`], `[model] quantize`, decoded a panel at a
//! time in every product on the CPU, dequantised whole per use elsewhere). The projection ops
//! ([`super::linear`], [`super::lora_linear`]) take either through the products here.

use std::sync::Arc;

use candle_core::{CpuStorage, Layout, Result, Shape, Storage, Tensor};

use super::frozen_weight::FrozenWeight;
use super::low_rank::{Factors, WithThin};
use super::matmul::{matmul, plus_product_f32};
use super::quant::{Orientation, QuantizedWeight};

#[derive(Clone)]
pub enum ProjectionWeight {
    Dense(FrozenWeight),
    Quantized(Arc<QuantizedWeight>),
}

impl From<FrozenWeight> for ProjectionWeight {
    fn from(w: FrozenWeight) -> Self {
        Self::Dense(w)
    }
}

impl From<QuantizedWeight> for ProjectionWeight {
    fn from(w: QuantizedWeight) -> Self {
        Self::Quantized(Arc::new(w))
    }
}

impl ProjectionWeight {
    /// (out_features, in_features).
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Self::Dense(w) => {
                let d = w.tensor().dims();
                (d[0], d[1])
            }
            Self::Quantized(q) => q.dims(),
        }
    }

    /// The dense weight, unless it is quantized.
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Self::Dense(w) => Some(w.tensor()),
            Self::Quantized(_) => None,
        }
    }

    /// The quantized weight, if it is one.
    pub fn quantized(&self) -> Option<&QuantizedWeight> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized(q) => Some(q),
        }
    }

    /// x·Wᵀ for x [n, in] on the CPU.
    pub(crate) fn cpu_forward(&self, x: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        match self {
            Self::Dense(w) => w.cpu_forward(x, lx),
            Self::Quantized(q) => match q.cpu_product(Orientation::Transposed, x, lx)? {
                Some(product) => Ok(product),
                None => FrozenWeight::new(q.dense()?).cpu_forward(x, lx),
            },
        }
    }

    /// x·Wᵀ for x [n, in] on a GPU (a quantized weight dequantised for this product).
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_forward(
        &self,
        x: &candle_core::CudaStorage,
        lx: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        match self {
            Self::Dense(w) => w.cuda_forward(x, lx),
            Self::Quantized(q) => FrozenWeight::new(q.dense()?).cuda_forward(x, lx),
        }
    }

    /// g·W for g [n, out], without gradients: the input gradient of x·Wᵀ.
    pub fn times(&self, g: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.times(g),
            Self::Quantized(q) => match cpu_times(q, g)? {
                Some((out, shape)) => Tensor::from_vec(out, shape, g.device()),
                None => matmul(g, &q.dense()?),
            },
        }
    }

    /// g·W + alpha·(c·d) without gradients; on the CPU the second product accumulates into the
    /// first one's buffer.
    pub fn times_plus(&self, g: &Tensor, (c, d): (&Tensor, &Tensor), alpha: f64) -> Result<Tensor> {
        match self {
            Self::Dense(w) => w.times_plus(g, (c, d), alpha),
            Self::Quantized(q) => match cpu_times(q, g)? {
                Some((out, shape)) => plus_product_f32(out, shape, (c, d), alpha, g.device()),
                None => {
                    let cd = (matmul(c, d)? * alpha)?.to_dtype(g.dtype())?;
                    matmul(g, &q.dense()?)?.to_dtype(cd.dtype())? + cd
                }
            },
        }
    }

    /// Whether a LoRA adapter's products on `rows` rows ride in this weight's own products on the
    /// CPU's bf16 kernel ([`Self::cpu_forward_low_rank`], [`Self::times_plus_low_rank`]).
    pub fn fuses_adapter(&self, rows: usize) -> bool {
        match self {
            Self::Dense(w) => w.fuses_adapter(rows),
            Self::Quantized(q) => q.fuses_adapter(rows),
        }
    }

    /// x·Wᵀ + scale·(x'·Aᵀ)·Bᵀ and x'·Aᵀ for f32 x [n, in] and a LoRA adapter's f32 A [r, in] and
    /// B [out, r], in one pass of the bf16 kernel, x' being x or, under dropout, the adapter's
    /// own input `dropped` (x⊙M); None where it does not apply ([`Self::fuses_adapter`]).
    pub(crate) fn cpu_forward_low_rank(
        &self,
        x: (&CpuStorage, &Layout),
        (a, la): (&CpuStorage, &Layout),
        (b, lb): (&CpuStorage, &Layout),
        scale: f64,
        dropped: Option<(&CpuStorage, &Layout)>,
    ) -> Result<Option<WithThin>> {
        let (at, bt) = (la.transpose(0, 1)?, lb.transpose(0, 1)?);
        let Some(factors) = Factors::of((a, &at), Some((b, &bt)), scale, dropped)? else {
            return Ok(None);
        };
        match self {
            Self::Dense(w) => w.cpu_plus_low_rank(Orientation::Transposed, x, &factors),
            Self::Quantized(q) => q.cpu_product_plus_low_rank(Orientation::Transposed, x, &factors),
        }
    }

    /// g·W + scale·(g·B)·A (only g·W unless `with_update`) and g·B without gradients, for f32
    /// g [n, out] and a LoRA adapter's f32 A [r, in] and B [out, r] (the input gradient of
    /// [`Self::cpu_forward_low_rank`]'s sum; under dropout the masked update is summed apart),
    /// in one pass of the bf16 kernel; None where it does not apply.
    pub fn times_plus_low_rank(
        &self,
        g: &Tensor,
        (a, b): (&Tensor, &Tensor),
        scale: f64,
        with_update: bool,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let (sg, lg) = g.storage_and_layout();
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (Storage::Cpu(sg), Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sg, &*sa, &*sb) else {
            return Ok(None);
        };
        let update = with_update.then_some((sa, la));
        let Some(factors) = Factors::of((sb, lb), update, scale, None)? else {
            return Ok(None);
        };
        let fused = match self {
            Self::Dense(w) => w.cpu_plus_low_rank(Orientation::Plain, (sg, lg), &factors)?,
            Self::Quantized(q) => {
                q.cpu_product_plus_low_rank(Orientation::Plain, (sg, lg), &factors)?
            }
        };
        fused
            .map(|((dx, dx_shape), (gb, gb_shape))| {
                Ok((
                    Tensor::from_vec(dx, dx_shape, g.device())?,
                    Tensor::from_vec(gb, gb_shape, g.device())?,
                ))
            })
            .transpose()
    }
}

/// How the projection weights are held, for the run log, e.g. `projections in q4_0: 12 of 14,
/// 0.1 MB; 2 dense, their rows not whole blocks`; None when none is quantized.
pub fn summary<'a>(weights: impl IntoIterator<Item = &'a ProjectionWeight>) -> Option<String> {
    let (mut formats, mut count, mut bytes, mut dense) = (Vec::new(), 0, 0, 0);
    for w in weights {
        match w.quantized() {
            Some(q) => {
                let name = q.format().name();
                if !formats.contains(&name) {
                    formats.push(name);
                }
                count += 1;
                bytes += q.bytes();
            }
            None => dense += 1,
        }
    }
    if count == 0 {
        return None;
    }
    let rest = match dense {
        0 => String::new(),
        n => format!("; {n} dense, their rows not whole blocks"),
    };
    Some(format!(
        "projections in {}: {count} of {}, {:.1} MB{rest}",
        formats.join(" and "),
        count + dense,
        bytes as f64 / 1e6
    ))
}

/// g·W through decoded panels where g is f32 on the CPU.
fn cpu_times(q: &QuantizedWeight, g: &Tensor) -> Result<Option<(Vec<f32>, Shape)>> {
    let (s, l) = g.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        return Ok(None);
    };
    Ok(match q.cpu_product(Orientation::Plain, s, l)? {
        Some((CpuStorage::F32(out), shape)) => Some((out, shape)),
        _ => None,
    })
}
