//! The gated MLP's activation SiLU(gate)·up as one pass forward and one pass backward on the
//! CPU. Composed from candle ops it is two passes forward and about ten backward (candle
//! differentiates SiLU through exp, add, recip and several products), each allocating a tensor
//! of the MLP's width. Elsewhere (CUDA, half precision) the composed ops run.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::cpu_slices::{contiguous, with_cpu_slices};
use super::elements::{assume_init, uninit};
use super::phases::{timed, Phase};
use super::vector_math;

/// SiLU(gate)·up for gate and up of one shape.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    let fused = gate.device().is_cpu()
        && gate.dtype() == up.dtype()
        && matches!(gate.dtype(), DType::F32 | DType::F64);
    if !fused {
        return gate.silu()? * up;
    }
    let (gate, up) = (gate.contiguous()?, up.contiguous()?);
    if gate.track_op() || up.track_op() {
        gate.apply_op2(&up, SiluMul)
    } else {
        gate.apply_op2_no_bwd(&up, &SiluMul)
    }
}

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

struct SiluMul;

fn forward_f32(gate: &[f32], up: &[f32]) -> Vec<f32> {
    let mut out = uninit::<f32>(gate.len());
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(o, (g, u))| vector_math::silu_mul(g, u, o));
    // SAFETY: every chunk was written whole.
    unsafe { assume_init(out) }
}

fn forward_f64(gate: &[f64], up: &[f64]) -> Vec<f64> {
    gate.par_iter()
        .zip(up)
        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
        .collect()
}

fn backward_f32(gate: &[f32], up: &[f32], grad: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let (mut d_gate, mut d_up) = (uninit::<f32>(gate.len()), uninit::<f32>(gate.len()));
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .zip(grad.par_chunks(CHUNK))
        .for_each(|(((dg, du), (g, u)), gr)| vector_math::silu_mul_backward(g, u, gr, dg, du));
    // SAFETY: every chunk of both was written whole.
    unsafe { (assume_init(d_gate), assume_init(d_up)) }
}

/// (d_gate, d_up) from the elements of gate, up and the output gradient.
type ElementGradients<T> = fn(&[T], &[T], &[T]) -> (Vec<T>, Vec<T>);

/// The gradients of gate and up as tensors of their shapes, from `backward` on the elements.
fn gradients<T: WithDType>(
    gate: &Tensor,
    up: &Tensor,
    grad: &Tensor,
    backward: ElementGradients<T>,
) -> Result<(Tensor, Tensor)> {
    let (dg, du) = with_cpu_slices([gate, up, grad], |[g, u, gr]: [&[T]; 3]| backward(g, u, gr))?;
    Ok((
        Tensor::from_vec(dg, gate.shape(), gate.device())?,
        Tensor::from_vec(du, up.shape(), up.device())?,
    ))
}

fn backward_f64(gate: &[f64], up: &[f64], grad: &[f64]) -> (Vec<f64>, Vec<f64>) {
    gate.par_iter()
        .zip(up)
        .zip(grad)
        .map(|((g, u), gr)| {
            let s = 1.0 / (1.0 + (-g).exp());
            (gr * u * s * (1.0 + g * (1.0 - s)), gr * g * s)
        })
        .unzip()
}

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        gate: &CpuStorage,
        lg: &Layout,
        up: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let out = timed(Phase::Elementwise, 0, || {
            Ok(match gate.dtype() {
                DType::F32 => CpuStorage::F32(forward_f32(
                    contiguous(gate.as_slice()?, lg)?,
                    contiguous(up.as_slice()?, lu)?,
                )),
                DType::F64 => CpuStorage::F64(forward_f64(
                    contiguous(gate.as_slice()?, lg)?,
                    contiguous(up.as_slice()?, lu)?,
                )),
                other => candle_core::bail!("silu·up: no CPU kernel for {other:?}"),
            })
        })?;
        Ok((out, lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let (d_gate, d_up) = timed(Phase::Elementwise, 0, || match gate.dtype() {
            DType::F32 => gradients(gate, up, &grad, backward_f32),
            _ => gradients(gate, up, &grad, backward_f64),
        })?;
        Ok((Some(d_gate), Some(d_up)))
    }
}
