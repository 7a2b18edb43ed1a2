//! RMSNorm as one pass per row on the CPU, forward and backward: y = x·r·w with
//! r = 1/√(mean(x²) + ε), and dL/dx = r·(g⊙w − x·r²·mean(g⊙w⊙x)); the frozen weight w gets no
//! gradient. Composed from candle ops the norm is six passes over the activations forward and
//! more backward (candle's fused `rms_norm` records no backward at all).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::cpu_slices::contiguous;
use super::elements::{assume_init, uninit};
use super::phases::{timed, Phase};
use super::vector_math;

/// RMSNorm of x [..., hidden] (f32 or f64, on the CPU) with weight [hidden] in x's dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let op = RmsNorm { eps };
    if x.track_op() {
        x.apply_op2(weight, op)
    } else {
        x.apply_op2_no_bwd(weight, &op)
    }
}

/// Whether [`rms_norm`] runs for x: CPU tensors in f32 or f64.
pub fn supports(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

struct RmsNorm {
    eps: f64,
}

/// Element types the norm runs in, with the per-row passes in that type: f32 through the
/// vectorised kernels of [`vector_math`] (sums of squares in f64 lanes), f64 as plain loops.
trait Float: Copy + Send + Sync + 'static {
    /// One row: out = x·r·w, r = 1/√(mean(x²) + eps).
    fn norm_row(x: &[Self], w: &[Self], eps: f64, out: &mut [MaybeUninit<Self>]);
    /// One row's dL/dx for the output gradient g.
    fn norm_backward_row(
        x: &[Self],
        w: &[Self],
        g: &[Self],
        eps: f64,
        out: &mut [MaybeUninit<Self>],
    );
}

impl Float for f32 {
    fn norm_row(x: &[f32], w: &[f32], eps: f64, out: &mut [MaybeUninit<f32>]) {
        vector_math::rms_norm_row(x, w, eps, out);
    }
    fn norm_backward_row(x: &[f32], w: &[f32], g: &[f32], eps: f64, out: &mut [MaybeUninit<f32>]) {
        vector_math::rms_norm_backward_row(x, w, g, eps, out);
    }
}

impl Float for f64 {
    fn norm_row(x: &[f64], w: &[f64], eps: f64, out: &mut [MaybeUninit<f64>]) {
        let sq = x.iter().map(|v| v * v).sum::<f64>();
        let r = 1.0 / (sq / w.len() as f64 + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
            o.write(v * r * w);
        }
    }
    fn norm_backward_row(x: &[f64], w: &[f64], g: &[f64], eps: f64, out: &mut [MaybeUninit<f64>]) {
        let (mut sq, mut gwx) = (0f64, 0f64);
        for ((v, gv), wv) in x.iter().zip(g).zip(w) {
            sq += v * v;
            gwx += gv * wv * v;
        }
        let hidden = w.len() as f64;
        let r = 1.0 / (sq / hidden + eps).sqrt();
        let c = r * r * gwx / hidden;
        for (((o, v), gv), wv) in out.iter_mut().zip(x).zip(g).zip(w) {
            o.write(r * (gv * wv - v * c));
        }
    }
}

/// Rows per parallel task (a few hundred kilobytes of activations).
const ROWS_PER_TASK: usize = 64;

fn forward<T: Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let hidden = w.len();
    let mut y = uninit::<T>(x.len());
    y.par_chunks_mut(hidden * ROWS_PER_TASK)
        .zip(x.par_chunks(hidden * ROWS_PER_TASK))
        .for_each(|(y, x)| {
            for (out, row) in y.chunks_mut(hidden).zip(x.chunks(hidden)) {
                T::norm_row(row, w, eps, out);
            }
        });
    // SAFETY: every row was written whole.
    unsafe { assume_init(y) }
}

/// dL/dx = r·(g⊙w − x·r²·mean(g⊙w⊙x)), rows in parallel.
fn backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let hidden = w.len();
    let mut dx = uninit::<T>(x.len());
    dx.par_chunks_mut(hidden * ROWS_PER_TASK)
        .zip(x.par_chunks(hidden * ROWS_PER_TASK))
        .zip(g.par_chunks(hidden * ROWS_PER_TASK))
        .for_each(|((dx, x), g)| {
            for ((out, row), grow) in dx
                .chunks_mut(hidden)
                .zip(x.chunks(hidden))
                .zip(g.chunks(hidden))
            {
                T::norm_backward_row(row, w, grow, eps, out);
            }
        });
    // SAFETY: every row was written whole.
    unsafe { assume_init(dx) }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = timed(Phase::Elementwise, 0, || {
            Ok(match (x, w) {
                (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                    CpuStorage::F32(forward(contiguous(x, lx)?, contiguous(w, lw)?, self.eps))
                }
                (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                    CpuStorage::F64(forward(contiguous(x, lx)?, contiguous(w, lw)?, self.eps))
                }
                _ => candle_core::bail!("rms norm: f32 or f64 input and weight of one dtype"),
            })
        })?;
        Ok((out, lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.detach().contiguous()?;
        let op = RmsNormBackward {
            eps: self.eps,
            weight: w.detach(),
        };
        let dx = timed(Phase::Elementwise, 0, || {
            x.detach().apply_op2_no_bwd(&g, &op)
        })?;
        Ok((Some(dx), None))
    }
}

/// dL/dx of [`RmsNorm`] from x and the output gradient.
struct RmsNormBackward {
    eps: f64,
    weight: Tensor,
}

impl CustomOp2 for RmsNormBackward {
    fn name(&self) -> &'static str {
        "rms-norm-backward"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        lx: &Layout,
        g: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (w, lw) = self.weight.storage_and_layout();
        let candle_core::Storage::Cpu(w) = &*w else {
            candle_core::bail!("rms norm: the weight is not on the CPU");
        };
        let out = match (x, g, w) {
            (CpuStorage::F32(x), CpuStorage::F32(g), CpuStorage::F32(w)) => {
                CpuStorage::F32(backward(
                    contiguous(x, lx)?,
                    contiguous(w, lw)?,
                    contiguous(g, lg)?,
                    self.eps,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g), CpuStorage::F64(w)) => {
                CpuStorage::F64(backward(
                    contiguous(x, lx)?,
                    contiguous(w, lw)?,
                    contiguous(g, lg)?,
                    self.eps,
                ))
            }
            _ => candle_core::bail!("rms norm backward: f32 or f64 tensors of one dtype"),
        };
        Ok((out, lx.shape().clone()))
    }
}
