//! RMSNorm as one pass per row on the CPU, forward and backward: y = x·r·w with
//! r = 1/√(mean(x²) + ε), and dL/dx = r·(g⊙w − x·r²·mean(g⊙w⊙x)); the frozen weight w gets no
//! gradient. Composed from candle ops the norm is six passes over the activations forward and
//! more backward (candle's fused `rms_norm` records no backward at all).

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu_slices::contiguous;

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

/// Element types the norm runs in.
trait Float: Copy + Send + Sync + 'static {
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
}

impl Float for f32 {
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        v as f32
    }
}

impl Float for f64 {
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
}

/// Rows per parallel task (a few hundred kilobytes of activations).
const ROWS_PER_TASK: usize = 64;

/// y = x·r·w, rows in parallel (1/r accumulated in f64 for every dtype).
fn forward<T: Float>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let hidden = w.len();
    let mut y = vec![T::from_f64(0.0); x.len()];
    y.par_chunks_mut(hidden * ROWS_PER_TASK)
        .zip(x.par_chunks(hidden * ROWS_PER_TASK))
        .for_each(|(y, x)| {
            for (out, row) in y.chunks_mut(hidden).zip(x.chunks(hidden)) {
                let sq = row.iter().map(|v| v.to_f64() * v.to_f64()).sum::<f64>();
                let r = 1.0 / (sq / hidden as f64 + eps).sqrt();
                for ((o, v), w) in out.iter_mut().zip(row).zip(w) {
                    *o = T::from_f64(v.to_f64() * r * w.to_f64());
                }
            }
        });
    y
}

/// dL/dx = r·(g⊙w − x·r²·mean(g⊙w⊙x)), rows in parallel.
fn backward<T: Float>(x: &[T], w: &[T], g: &[T], eps: f64) -> Vec<T> {
    let hidden = w.len();
    let mut dx = vec![T::from_f64(0.0); x.len()];
    dx.par_chunks_mut(hidden * ROWS_PER_TASK)
        .zip(x.par_chunks(hidden * ROWS_PER_TASK))
        .zip(g.par_chunks(hidden * ROWS_PER_TASK))
        .for_each(|((dx, x), g)| {
            for ((out, row), grow) in dx
                .chunks_mut(hidden)
                .zip(x.chunks(hidden))
                .zip(g.chunks(hidden))
            {
                let (mut sq, mut gwx) = (0f64, 0f64);
                for ((v, gv), wv) in row.iter().zip(grow).zip(w) {
                    let v = v.to_f64();
                    sq += v * v;
                    gwx += gv.to_f64() * wv.to_f64() * v;
                }
                let r = 1.0 / (sq / hidden as f64 + eps).sqrt();
                let c = r * r * gwx / hidden as f64;
                for (((o, v), gv), wv) in out.iter_mut().zip(row).zip(grow).zip(w) {
                    *o = T::from_f64(r * (gv.to_f64() * wv.to_f64() - v.to_f64() * c));
                }
            }
        });
    dx
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
        let out = match (x, w) {
            (CpuStorage::F32(x), CpuStorage::F32(w)) => {
                CpuStorage::F32(forward(contiguous(x, lx)?, contiguous(w, lw)?, self.eps))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w)) => {
                CpuStorage::F64(forward(contiguous(x, lx)?, contiguous(w, lw)?, self.eps))
            }
            _ => candle_core::bail!("rms norm: f32 or f64 input and weight of one dtype"),
        };
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
        let dx = x.detach().apply_op2_no_bwd(&g, &op)?;
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
