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
use std::mem::MaybeUninit;

use num_traits::Float;
use rayon::prelude::*;

use super::amx::{self, Bf16Kernel, PackedRhs};
use super::blocks;
use super::elements::{assume_init, uninit, Strided};
use super::matmul::Real;
use super::vector_math::{self, SoftmaxRow};

/// Element types the kernel runs in (the activations' on the CPU: f32, or f64 for f64 models).
pub(crate) trait Element:
    Real + Float + SoftmaxRow + std::ops::AddAssign + std::ops::MulAssign + Send + Sync
{
}

impl Element for f32 {}
impl Element for f64 {}

/// The sizes of one attention call: q [batch, kv_heads, groups·seq, d] (the query heads that
/// share a K/V head stacked along the rows), k, v [batch, kv_heads, past + seq, d], mask [batch,
/// seq, past + seq] (additive, causal: query row r sees no key after past + r), all contiguous;
/// the batch is what the slices hold.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dims {
    pub kv_heads: usize,
    pub groups: usize,
    pub seq: usize,
    /// Keys cached before the queries' own (a KV cache's earlier positions; their K/V rows come
    /// first). 0 in training: the backward takes no cached keys.
    pub past: usize,
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

    /// Key positions per K/V head: the cached ones and the queries' own.
    fn slots(&self) -> usize {
        self.past + self.seq
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
    let slots = dims.slots();
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
            let keys = dims.past + start + len;
            let q_rows = matrix(q, head * t * d + start * d, len, d);
            let k_seen = matrix(k, kv * slots * d, keys, d);
            let v_seen = matrix(v, kv * slots * d, keys, d);
            let mut p = vec![T::zero(); len * keys];
            scores(&mut p, q_rows, k_seen, scale, len, keys);
            for (r, row) in p.chunks_mut(keys).enumerate() {
                dims.cap(row, None);
                let mask_row = &mask[(batch * t + start + r) * slots..][..keys];
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

/// The output of [`forward`] with bf16 products on `kernel` (AMX tiles or AVX512_BF16), for
/// passes that take no gradient: Q, K, the probabilities and V rounded to bf16, the products
/// summed in f32, the softmax in f32. Each K/V head's Kᵀ and V are packed for the kernel once;
/// each block of query rows multiplies only the keys it sees.
pub(crate) fn forward_bf16(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: &[f32],
    dims: Dims,
    kernel: Bf16Kernel,
) -> Vec<f32> {
    let (t, d, g) = (dims.seq, dims.head_dim, dims.groups);
    let slots = dims.slots();
    let mut out = vec![0f32; q.len()];
    if q.is_empty() {
        return out;
    }
    let scale = dims.scale as f32;
    // Kᵀ [d, slots] and V [slots, d] of every K/V head.
    let packed: Vec<(PackedRhs, PackedRhs)> = (0..k.len() / (slots * d))
        .into_par_iter()
        .map(|kv| {
            let kt = Strided::new(k, kv * slots * d, (d, slots), (1, d));
            let vv = Strided::new(v, kv * slots * d, (slots, d), (d, 1));
            (PackedRhs::new(&kt), PackedRhs::new(&vv))
        })
        .collect();
    let blocks: Vec<(usize, usize)> = blocks::ranges(t, dims.block).collect();
    let mut tasks = Vec::new();
    for (head, out) in out.chunks_mut(dims.head_rows()).enumerate() {
        for (&block, out) in blocks.iter().zip(split_rows(out, &blocks, d)) {
            tasks.push((head, block, out));
        }
    }
    tasks.into_par_iter().for_each(|(head, (start, len), out)| {
        let kv = head / g;
        let batch = kv / dims.kv_heads;
        let keys = dims.past + start + len;
        let (kt, vv) = &packed[kv];
        let dp = d.next_multiple_of(32);
        let q_rows = amx::pack_rows(
            &Strided::new(q, (head * t + start) * d, (len, d), (d, 1)),
            dp,
        );
        let mut p = uninit::<f32>(len * keys);
        // SAFETY: this task alone writes `p` (len × keys) and its own output rows; the
        // kernel is one this CPU runs and writes every element of `p`.
        let mut p = unsafe {
            amx::compute_columns(
                kernel,
                (&q_rows, dp),
                &[kt.part()],
                (len, keys),
                p.as_mut_ptr().cast(),
                keys,
            );
            assume_init(p)
        };
        // Unnormalised probabilities exp(s − max), rounded to bf16 straight into the product's
        // rows (zero-padded to whole tiles); each output row is divided by its sum after it.
        let kp = keys.next_multiple_of(32);
        let mut p_rows = uninit::<u16>(len.next_multiple_of(32) * kp);
        let mut sums = Vec::with_capacity(len);
        for (r, (row, packed)) in p.chunks_mut(keys).zip(p_rows.chunks_mut(kp)).enumerate() {
            let mask_row = &mask[(batch * t + start + r) * slots..][..keys];
            let max = if dims.softcap.is_some() {
                vector_math::scale(row, scale);
                dims.cap(row, None);
                row.iter_mut().zip(mask_row).for_each(|(x, m)| *x += *m);
                f32::row_max(row)
            } else {
                vector_math::scale_add_max(row, scale, mask_row)
            };
            let (values, padding) = packed.split_at_mut(keys);
            sums.push(vector_math::exp_shifted_bf16(row, max, values));
            padding.fill(MaybeUninit::new(0));
        }
        p_rows[len * kp..].fill(MaybeUninit::new(0));
        // SAFETY: every row above wrote its values and padding; the padding rows are zeroed.
        let p_rows = unsafe { assume_init(p_rows) };
        // SAFETY: as above, for this task's output rows (len × d).
        unsafe {
            amx::compute_columns(
                kernel,
                (&p_rows, kp),
                &[vv.first_rows(keys)],
                (len, d),
                out.as_mut_ptr(),
                d,
            )
        };
        for (row, sum) in out.chunks_mut(d).zip(sums) {
            vector_math::scale(row, 1.0 / sum);
        }
    });
    out
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
    assert_eq!(dims.past, 0, "attention: no backward through cached keys");
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
