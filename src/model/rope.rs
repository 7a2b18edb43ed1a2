//! Rotary position embeddings as transformers computes them (default, linear, llama3 and longrope
//! scaling; partial rotation of each head's leading `rotary_dim` dimensions).
//! On the CPU the heads are split out of a projection and rotated in one pass, forward and
//! backward; elsewhere they are applied with differentiable candle ops (candle's fused rope has
//! no backward).

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, WithDType, D};
use num_traits::Float;
use rayon::prelude::*;

use super::kernels::cpu_slices::{contiguous, with_cpu_slices};
use super::kernels::elements::{assume_init, uninit};
use super::kernels::phases::{timed, Phase};

use super::config::{ModelConfig, RopeScaling};

/// The inverse frequencies of the rotated part of a head, after scaling.
pub struct Rope {
    inv_freq: Vec<f32>,
    /// LongRoPE: the frequencies a pass uses once its positions reach past the given count.
    long: Option<(Vec<f32>, usize)>,
    /// Factor on cos and sin (LongRoPE's attention factor; 1 otherwise).
    scale: f32,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.rotary_dim;
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        let (mut long, mut scale) = (None, 1.0);
        match &config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                inv_freq.iter_mut().for_each(|f| *f /= *factor as f32)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => llama3(
                &mut inv_freq,
                *factor as f32,
                *low_freq_factor as f32,
                *high_freq_factor as f32,
                *old_len as f32,
            ),
            RopeScaling::LongRope {
                short_factor,
                long_factor,
                attention_factor,
                original_max_position_embeddings,
            } => {
                // transformers: 1 / (factor · base^(2i/dim)), in f32.
                let divided = |factors: &[f64]| -> Vec<f32> {
                    (0..dim / 2)
                        .map(|i| {
                            let ext = factors[i] as f32;
                            1.0 / (ext * base.powf((2 * i) as f32 / dim as f32))
                        })
                        .collect()
                };
                inv_freq = divided(short_factor);
                long = Some((divided(long_factor), *original_max_position_embeddings));
                scale = *attention_factor as f32;
            }
        }
        Self {
            inv_freq,
            long,
            scale,
        }
    }

    /// cos and sin tables of shape [batch, 1, seq, rotary_dim] for the given position ids. With
    /// LongRoPE, the whole pass uses the long factors when its last position lies past the
    /// original context, as transformers decides per forward call.
    pub fn tables(
        &self,
        position_ids: &[u32],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let seen = position_ids.iter().max().map_or(0, |p| *p as usize + 1);
        let inv_freq = match &self.long {
            Some((long, original)) if seen > *original => long,
            _ => &self.inv_freq,
        };
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(position_ids.len() * half * 2);
        let mut sin = Vec::with_capacity(position_ids.len() * half * 2);
        for &p in position_ids {
            let angles: Vec<f32> = inv_freq.iter().map(|f| f * p as f32).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() * self.scale));
                sin.extend(angles.iter().map(|a| a.sin() * self.scale));
            }
        }
        let shape = (batch, 1, seq, half * 2);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

/// Llama 3.x scaling: long wavelengths divided by `factor`, short ones kept, a smooth band between.
fn llama3(inv_freq: &mut [f32], factor: f32, low: f32, high: f32, old_len: f32) {
    let low_freq_wavelen = old_len / low;
    let high_freq_wavelen = old_len / high;
    for f in inv_freq.iter_mut() {
        let wavelen = 2.0 * std::f32::consts::PI / *f;
        let scaled = if wavelen > low_freq_wavelen {
            *f / factor
        } else {
            *f
        };
        let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
        *f = if is_medium {
            let smooth = (old_len / wavelen - low) / (high - low);
            (1.0 - smooth) * scaled / factor + smooth * scaled
        } else {
            scaled
        };
    }
}

/// The heads of a projection y [batch·seq, heads·head_dim] (or [batch, seq, heads·head_dim]), as
/// [batch, heads, seq, head_dim], rotated by the tables of [`Rope::tables`]: the first
/// `rotary_dim` (the tables' width) dimensions of each head rotate, the rest pass unchanged.
pub fn split_heads_rotated(
    y: &Tensor,
    (batch, seq, heads): (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    let d = y.dim(D::Minus1)? / heads.max(1);
    let rotary = cos.dim(D::Minus1)?;
    if rotary > d || !rotary.is_multiple_of(2) {
        anyhow::bail!("rope: tables of width {rotary} do not fit heads of {d} dimensions");
    }
    let dims = RotateDims {
        batch,
        seq,
        heads,
        head_dim: d,
        rotary,
    };
    let fused = y.device().is_cpu() && matches!(y.dtype(), DType::F32 | DType::F64);
    if !fused {
        let split = y
            .reshape((batch, seq, heads, d))?
            .transpose(1, 2)?
            .contiguous()?;
        return apply(&split, cos, sin);
    }
    if y.elem_count() != batch * seq * heads * d {
        anyhow::bail!(
            "rope: a projection of shape {:?} is not {batch} × {seq} rows of {heads} heads",
            y.dims()
        );
    }
    let op = SplitRotate {
        dims,
        cos: cos.to_dtype(y.dtype())?.contiguous()?,
        sin: sin.to_dtype(y.dtype())?.contiguous()?,
    };
    let y = y.contiguous()?;
    Ok(if y.track_op() {
        y.apply_op1(op)?
    } else {
        y.apply_op1_no_bwd(&op)?
    })
}

/// x·cos + rotate_half(x)·sin for x [batch, heads, seq, head_dim] on the tables' width of each
/// head; the dimensions past it pass unchanged.
fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (d, rotary) = (x.dim(D::Minus1)?, cos.dim(D::Minus1)?);
    if rotary < d {
        let rotated = apply(&x.narrow(D::Minus1, 0, rotary)?, cos, sin)?;
        let kept = x.narrow(D::Minus1, rotary, d - rotary)?;
        return Ok(Tensor::cat(&[&rotated, &kept], D::Minus1)?);
    }
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}

/// The fused split-and-rotate on the CPU; cos and sin [batch, 1, seq, rotary] in y's dtype.
struct SplitRotate {
    dims: RotateDims,
    cos: Tensor,
    sin: Tensor,
}

/// The sizes of one split-and-rotate.
#[derive(Clone, Copy)]
struct RotateDims {
    batch: usize,
    seq: usize,
    heads: usize,
    head_dim: usize,
    /// The leading dimensions of each head that rotate (the tables' width).
    rotary: usize,
}

/// out[b, h, t, :r] = y[b, t, h, :r]·cos[b, t] + rotate_half(y[b, t, h, :r])·sin[b, t], where
/// rotate_half(x) = [−x₂, x₁], and out[b, h, t, r:] = y[b, t, h, r:] for r = `rotary`; one task
/// per (batch, head).
fn rotate<T: Float + Send + Sync>(y: &[T], cos: &[T], sin: &[T], dims: RotateDims) -> Vec<T> {
    let RotateDims {
        seq: t,
        heads: h,
        head_dim: d,
        rotary: r,
        ..
    } = dims;
    let half = r / 2;
    let mut out = uninit::<T>(y.len());
    out.par_chunks_mut(t * d).enumerate().for_each(|(bh, out)| {
        let (b, head) = (bh / h, bh % h);
        for (pos, o) in out.chunks_mut(d).enumerate() {
            let x = &y[((b * t + pos) * h + head) * d..][..d];
            let (c, s) = (
                &cos[(b * t + pos) * r..][..r],
                &sin[(b * t + pos) * r..][..r],
            );
            // Two loops without a branch inside, so that each vectorises.
            for j in 0..half {
                o[j].write(x[j] * c[j] + -x[j + half] * s[j]);
            }
            for j in half..r {
                o[j].write(x[j] * c[j] + x[j - half] * s[j]);
            }
            for (o, x) in o[r..].iter_mut().zip(&x[r..]) {
                o.write(*x);
            }
        }
    });
    // SAFETY: every element of every head row was written.
    unsafe { assume_init(out) }
}

/// The gradient of [`rotate`] for the output gradient g [batch, heads, seq, d]: for j < r,
/// dy[b, t, h, j] = g_j·cos_j + (g_{j+r/2}·sin_{j+r/2} for j < r/2, −g_{j−r/2}·sin_{j−r/2}
/// otherwise); past r, dy = g.
fn rotate_backward<T: Float + Send + Sync>(
    g: &[T],
    cos: &[T],
    sin: &[T],
    dims: RotateDims,
) -> Vec<T> {
    let RotateDims {
        seq: t,
        heads: h,
        head_dim: d,
        rotary: r,
        ..
    } = dims;
    let half = r / 2;
    let mut dy = uninit::<T>(g.len());
    dy.par_chunks_mut(h * d).enumerate().for_each(|(bt, dy)| {
        let (b, pos) = (bt / t, bt % t);
        let (c, s) = (&cos[bt * r..][..r], &sin[bt * r..][..r]);
        for (head, out) in dy.chunks_mut(d).enumerate() {
            let gr = &g[((b * h + head) * t + pos) * d..][..d];
            for (o, g) in out[r..].iter_mut().zip(&gr[r..]) {
                o.write(*g);
            }
            for j in 0..half {
                out[j].write(gr[j] * c[j] + gr[j + half] * s[j + half]);
            }
            for j in half..r {
                out[j].write(gr[j] * c[j] + -(gr[j - half] * s[j - half]));
            }
        }
    });
    // SAFETY: every element of every row was written.
    unsafe { assume_init(dy) }
}

impl SplitRotate {
    /// The forward rotation of the projection's elements `y`.
    fn forward<T: Float + Send + Sync + WithDType>(
        &self,
        y: &[T],
        dims: RotateDims,
    ) -> candle_core::Result<Vec<T>> {
        with_cpu_slices([&self.cos, &self.sin], |[cos, sin]: [&[T]; 2]| {
            rotate(y, cos, sin, dims)
        })
    }

    /// The projection's gradient for the output gradient `grad`.
    fn backward<T: Float + Send + Sync + WithDType>(
        &self,
        grad: &Tensor,
        dims: RotateDims,
    ) -> candle_core::Result<Vec<T>> {
        with_cpu_slices([grad, &self.cos, &self.sin], |[g, cos, sin]: [&[T]; 3]| {
            rotate_backward(g, cos, sin, dims)
        })
    }
}

impl CustomOp1 for SplitRotate {
    fn name(&self) -> &'static str {
        "split-rotate"
    }

    fn cpu_fwd(&self, y: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims = self.dims;
        let out = timed(Phase::Elementwise, 0, || {
            Ok(match y {
                CpuStorage::F32(y) => CpuStorage::F32(self.forward(contiguous(y, layout)?, dims)?),
                CpuStorage::F64(y) => CpuStorage::F64(self.forward(contiguous(y, layout)?, dims)?),
                _ => candle_core::bail!("rope: no CPU kernel for this dtype"),
            })
        })?;
        let shape = (dims.batch, dims.heads, dims.seq, dims.head_dim);
        Ok((out, Shape::from(shape)))
    }

    fn bwd(&self, y: &Tensor, _out: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dims = self.dims;
        let grad = grad.contiguous()?;
        let dy = timed(Phase::Elementwise, 0, || {
            candle_core::Result::Ok(match y.dtype() {
                DType::F32 => {
                    Tensor::from_vec(self.backward::<f32>(&grad, dims)?, y.shape(), y.device())?
                }
                _ => Tensor::from_vec(self.backward::<f64>(&grad, dims)?, y.shape(), y.device())?,
            })
        })?;
        Ok(Some(dy))
    }
}
