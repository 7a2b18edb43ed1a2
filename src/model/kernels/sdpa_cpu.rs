//! Causal scaled dot-product attention on the CPU as one fused kernel per head, forward and
//! backward, in FlashAttention-2's loop order: for each block of query rows, the scores against
//! the keys it can see are computed, masked, turned into probabilities in place and multiplied
//! by V while they are still in cache. The forward keeps each row's log-sum-exp, so the backward
//! recomputes the probabilities in one pass; dK and dV accumulate over the blocks of a head.
//!
//! Composed from candle ops the same work is about a dozen passes over [rows, keys] tensors,
//! each allocating, with a single-threaded exp. Heads (and, forward, query blocks) run in
//! parallel; the products inside a head run on one thread through faer.

use faer::{Accum, MatMut, MatRef, Par};
use num_traits::Float;
use rayon::prelude::*;

use super::blocks;
use super::matmul::Real;
use super::vector_math;

/// Element types the kernel runs in (the activations' on the CPU: f32, or f64 for f64 models).
pub(crate) trait Element:
    Real + Float + std::ops::AddAssign + std::ops::MulAssign + Send + Sync
{
    /// The largest element of a row.
    fn row_max(row: &[Self]) -> Self;
    /// Replaces each x of `row` with exp(x − shift) and returns their sum.
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self;
}

impl Element for f32 {
    fn row_max(row: &[Self]) -> Self {
        vector_math::max(row)
    }
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self {
        vector_math::exp_shifted_sum(row, shift)
    }
}

impl Element for f64 {
    fn row_max(row: &[Self]) -> Self {
        row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v))
    }
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self {
        row.iter_mut()
            .map(|v| {
                *v = (*v - shift).exp();
                *v
            })
            .sum()
    }
}

/// The sizes of one attention call: q [batch, kv_heads, groups·seq, d] (the query heads that
/// share a K/V head stacked along the rows), k, v [batch, kv_heads, seq, d], mask [batch, seq,
/// seq] (additive, causal), all contiguous; the batch is what the slices hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub kv_heads: usize,
    pub groups: usize,
    pub seq: usize,
    pub head_dim: usize,
    /// Query positions per block (the block's scores [rows, keys] should stay in cache).
    pub block: usize,
    /// The factor on q·kᵀ.
    pub scale: f64,
    /// Scores capped to cap·tanh(s/cap) before the mask (Gemma 2), when set.
    pub softcap: Option<f64>,
}

impl Dims {
    fn scale<T: Element>(&self) -> T {
        T::from(self.scale).unwrap_or_else(T::one)
    }

    /// Caps a row of scaled scores in place when the scores are capped; with `slopes`, writes
    /// the cap's derivative 1 − tanh² of each score there.
    fn cap<T: Element>(&self, row: &mut [T], slopes: Option<&mut [T]>) {
        if let Some(cap) = self.softcap.and_then(T::from) {
            super::softcap::row(row, cap, slopes);
        }
    }

    /// The query rows of one (batch, kv head, group) triple in q: seq × d elements.
    fn head_rows(&self) -> usize {
        self.seq * self.head_dim
    }
}

/// The forward pass: the output [batch, kv_heads, groups·seq, d] and each query row's
/// log-sum-exp of its masked, scaled scores [batch, kv_heads, groups·seq].
pub(crate) fn forward<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &[T],
    dims: Dims,
) -> (Vec<T>, Vec<T>) {
    let (t, d, g) = (dims.seq, dims.head_dim, dims.groups);
    let mut out = vec![T::zero(); q.len()];
    let mut lse = vec![T::zero(); q.len() / d.max(1)];
    if q.is_empty() {
        return (out, lse);
    }
    let scale = dims.scale::<T>();
    // One task per (batch, kv head, group, block of query rows).
    let blocks: Vec<(usize, usize)> = blocks::ranges(t, dims.block).collect();
    let mut tasks = Vec::new();
    for (head, (out, lse)) in out
        .chunks_mut(dims.head_rows())
        .zip(lse.chunks_mut(t))
        .enumerate()
    {
        let parts = split_rows(out, &blocks, d)
            .into_iter()
            .zip(split_rows(lse, &blocks, 1));
        for (&block, (out, lse)) in blocks.iter().zip(parts) {
            tasks.push((head, block, out, lse));
        }
    }
    tasks
        .into_par_iter()
        .for_each(|(head, (start, len), out, lse)| {
            let kv = head / g;
            let batch = kv / dims.kv_heads;
            let keys = start + len;
            let q_rows = matrix(q, head * t * d + start * d, len, d);
            let k_seen = matrix(k, kv * t * d, keys, d);
            let v_seen = matrix(v, kv * t * d, keys, d);
            let mut p = vec![T::zero(); len * keys];
            scores(&mut p, q_rows, k_seen, scale, len, keys);
            for (r, row) in p.chunks_mut(keys).enumerate() {
                dims.cap(row, None);
                let mask_row = &mask[(batch * t + start + r) * t..][..keys];
                row.iter_mut().zip(mask_row).for_each(|(x, m)| *x += *m);
                let max = T::row_max(row);
                let sum = T::exp_shifted_sum(row, max);
                let inv = T::one() / sum;
                row.iter_mut().for_each(|x| *x *= inv);
                lse[r] = max + sum.ln();
            }
            let dst = matrix_mut(out, len, d);
            faer::linalg::matmul::matmul(
                dst,
                Accum::Replace,
                matrix(&p, 0, len, keys),
                v_seen,
                T::ONE,
                Par::Seq,
            );
        });
    (out, lse)
}

/// The gradients of q, k and v for the output gradient `grad` (q's layout), given the forward's
/// output and log-sum-exps.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Element>(
    q: &[T],
    k: &[T],
    v: &[T],
    mask: &[T],
    out: &[T],
    lse: &[T],
    grad: &[T],
    dims: Dims,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (t, d, g) = (dims.seq, dims.head_dim, dims.groups);
    let (mut dq, mut dk, mut dv) = (
        vec![T::zero(); q.len()],
        vec![T::zero(); k.len()],
        vec![T::zero(); v.len()],
    );
    if q.is_empty() {
        return (dq, dk, dv);
    }
    let scale = dims.scale::<T>();
    // One task per (batch, kv head): its dK and dV sum over all its query rows.
    dq.par_chunks_mut(g * t * d)
        .zip(dk.par_chunks_mut(t * d))
        .zip(dv.par_chunks_mut(t * d))
        .enumerate()
        .for_each(|(kv, ((dq, dk), dv))| {
            let batch = kv / dims.kv_heads;
            let mut p = vec![T::zero(); dims.block.min(t) * t];
            let mut dp = vec![T::zero(); dims.block.min(t) * t];
            let capped = dims.softcap.is_some();
            let mut slopes = vec![T::zero(); if capped { dims.block.min(t) * t } else { 0 }];
            for group in 0..g {
                let head = kv * g + group;
                for (start, len) in blocks::ranges(t, dims.block) {
                    let keys = start + len;
                    let rows = head * t + start;
                    let q_rows = matrix(q, rows * d, len, d);
                    let g_rows = matrix(grad, rows * d, len, d);
                    let k_seen = matrix(k, kv * t * d, keys, d);
                    let v_seen = matrix(v, kv * t * d, keys, d);
                    let p = &mut p[..len * keys];
                    let dp = &mut dp[..len * keys];
                    let slopes = &mut slopes[..if capped { len * keys } else { 0 }];
                    // The probabilities, from the scores and the forward's log-sum-exp.
                    scores(p, q_rows, k_seen, scale, len, keys);
                    for (r, row) in p.chunks_mut(keys).enumerate() {
                        dims.cap(row, capped.then(|| &mut slopes[r * keys..][..keys]));
                        let mask_row = &mask[(batch * t + start + r) * t..][..keys];
                        row.iter_mut().zip(mask_row).for_each(|(x, m)| *x += *m);
                        T::exp_shifted_sum(row, lse[rows + r]);
                    }
                    let p_seen = matrix(p, 0, len, keys);
                    // dV += Pᵀ·dO
                    faer::linalg::matmul::matmul(
                        matrix_mut(&mut dv[..keys * d], keys, d),
                        Accum::Add,
                        p_seen.transpose(),
                        g_rows,
                        T::ONE,
                        Par::Seq,
                    );
                    // dP = dO·Vᵀ
                    faer::linalg::matmul::matmul(
                        matrix_mut(dp, len, keys),
                        Accum::Replace,
                        g_rows,
                        v_seen.transpose(),
                        T::ONE,
                        Par::Seq,
                    );
                    // dS = P ∘ (dP − rowsum(dO ∘ O)) · scale, written over P; capped scores
                    // also carry the cap's slope 1 − tanh².
                    for (r, (p_row, dp_row)) in p.chunks_mut(keys).zip(dp.chunks(keys)).enumerate()
                    {
                        let o = &out[(rows + r) * d..][..d];
                        let go = &grad[(rows + r) * d..][..d];
                        let row_dot = o.iter().zip(go).fold(T::zero(), |s, (a, b)| s + *a * *b);
                        p_row
                            .iter_mut()
                            .zip(dp_row)
                            .for_each(|(p, dp)| *p = *p * (*dp - row_dot) * scale);
                        if capped {
                            let slope_row = &slopes[r * keys..][..keys];
                            p_row.iter_mut().zip(slope_row).for_each(|(p, s)| *p *= *s);
                        }
                    }
                    let ds = matrix(p, 0, len, keys);
                    // dQ = dS·K
                    faer::linalg::matmul::matmul(
                        matrix_mut(&mut dq[(group * t + start) * d..][..len * d], len, d),
                        Accum::Replace,
                        ds,
                        k_seen,
                        T::ONE,
                        Par::Seq,
                    );
                    // dK += dSᵀ·Q
                    faer::linalg::matmul::matmul(
                        matrix_mut(&mut dk[..keys * d], keys, d),
                        Accum::Add,
                        ds.transpose(),
                        q_rows,
                        T::ONE,
                        Par::Seq,
                    );
                }
            }
        });
    (dq, dk, dv)
}

/// The scaled scores scale·Q·Kᵀ [len, keys] into `dst`.
fn scores<T: Element>(
    dst: &mut [T],
    q_rows: MatRef<'_, T>,
    k_seen: MatRef<'_, T>,
    scale: T,
    len: usize,
    keys: usize,
) {
    faer::linalg::matmul::matmul(
        matrix_mut(dst, len, keys),
        Accum::Replace,
        q_rows,
        k_seen.transpose(),
        scale,
        Par::Seq,
    );
}

/// `rows` × `cols` row-major elements of `data` from `offset`.
fn matrix<T>(data: &[T], offset: usize, rows: usize, cols: usize) -> MatRef<'_, T> {
    MatRef::from_row_major_slice(&data[offset..offset + rows * cols], rows, cols)
}

/// A row-major `rows` × `cols` view of all of `data`.
fn matrix_mut<T>(data: &mut [T], rows: usize, cols: usize) -> MatMut<'_, T> {
    MatMut::from_row_major_slice_mut(&mut data[..rows * cols], rows, cols)
}

/// `data` cut into the rows of each block (`width` elements per row).
fn split_rows<'a, T>(
    mut data: &'a mut [T],
    blocks: &[(usize, usize)],
    width: usize,
) -> Vec<&'a mut [T]> {
    let mut parts = Vec::with_capacity(blocks.len());
    for &(_, len) in blocks {
        let (part, rest) = data.split_at_mut(len * width);
        parts.push(part);
        data = rest;
    }
    parts
}
