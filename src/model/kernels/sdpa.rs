//! Scaled dot-product attention that holds the scores of only one block of query rows at a time,
//! in the forward and in the backward pass (FlashAttention's scheme, in plain candle ops).
//!
//! Eager attention keeps several [batch, heads, seq, seq] tensors per layer alive for the backward
//! pass (scores, their f32 copy, the softmax's intermediates, the probabilities). Here the forward
//! runs outside the graph and keeps nothing; a custom op re-attaches the output, and its backward
//! recomputes each block's probabilities from Q, K and the mask. Grouped-query heads share their
//! K/V head without copies: the query heads of a group are stacked along the rows.
//!
//! On the CPU (f32 or f64 activations) the whole of it runs as the fused kernel of
//! [`super::sdpa_cpu`], and so do new tokens after a KV cache; the composed path here serves CUDA
//! and half precision.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, WithDType, D};

use super::blocks;
use super::cpu_slices::with_cpu_slices;
use super::matmul::{matmul, matmul_wide};
use super::phases::{timed, Phase};
use super::precomputed::Precomputed;
use super::sdpa_cpu;

/// Bytes of scores (in f32) that one block may hold; blocks split the query positions evenly.
const BLOCK_BYTES: usize = 64 << 20;

/// Query positions per block for `batch` × `heads` × `seq`: at most [`CAUSAL_BLOCK`], fewer when
/// their scores would pass the byte budget.
pub fn block_rows(batch: usize, heads: usize, seq: usize) -> usize {
    blocks::even_block(seq, batch * heads * seq * 4, BLOCK_BYTES).min(CAUSAL_BLOCK)
}

/// Query positions per block at most: smaller blocks skip more of the keys a causal mask hides
/// (a block sees only the keys up to its last row), at the cost of more, smaller products.
const CAUSAL_BLOCK: usize = 64;

/// How scores are formed from q·kᵀ: times `scale`, then capped to cap·tanh(s/cap) when `softcap`
/// is set (Gemma 2), before the mask is added.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    pub scale: f64,
    pub softcap: Option<f64>,
    /// Whether a pass that takes no gradient multiplies in bf16 on the CPU's bf16 kernel, where
    /// it has one: q·kᵀ and the probabilities times V take bf16 operands and sum in f32, as
    /// PyTorch runs a bf16 model's attention. The decoder asks for it in a bf16 model's inference
    /// passes; training keeps f32 products, so that the backward's recomputed probabilities (and
    /// a checkpointed layer's recomputed forward) are the forward's.
    pub bf16_products: bool,
}

impl Scoring {
    /// 1/√head_dim, uncapped, f32 products: what most families use.
    pub fn standard(head_dim: usize) -> Self {
        Self {
            scale: 1.0 / (head_dim as f64).sqrt(),
            softcap: None,
            bf16_products: false,
        }
    }

    /// The scores of q [.., rows, d] and k [.., keys, d] in the dtype of `acc`, and, when capped
    /// and `slopes`, the cap's derivative 1 − tanh² of each.
    fn scores(
        &self,
        q: &Tensor,
        k: &Tensor,
        acc: DType,
        slopes: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let raw = (matmul_wide(q, &k.t()?)?.to_dtype(acc)? * self.scale)?;
        match self.softcap {
            None => Ok((raw, None)),
            Some(cap) => super::softcap::tensor(&raw, cap, slopes),
        }
    }
}

/// softmax(scoring(Q·Kᵀ) + mask)·V in blocks of `block` query positions.
///
/// q: [batch, kv_heads, groups·seq, d], the `groups` query heads that share a K/V head stacked
/// along the rows; k, v: [batch, kv_heads, seq, d]; mask: [batch, 1, seq, seq], additive, in the
/// dtype the softmax runs in (f32; f64 for f64 models), and causal (no position sees a later one:
/// the decoder's masks, packed or windowed, never do). Returns [batch, kv_heads, groups·seq, d].
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    block: usize,
    scoring: Scoring,
) -> Result<Tensor> {
    let shape = Shapes::of(q, k, block, scoring)?;
    let flops = 4 * shape.scores() * k.dim(3)?;
    let square_mask = mask.dims() == [shape.batch, 1, shape.seq, shape.seq];
    if let Some(dtype) = fused_cpu_dtype(q, k, v, mask).filter(|_| square_mask) {
        return fused(q, k, v, mask, shape, dtype);
    }
    let out = timed(Phase::Attention, flops, || {
        shape.forward(&q.detach(), &k.detach(), &v.detach(), mask)
    })?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    q.apply_op3(
        k,
        v,
        BlockwiseAttention {
            shape,
            mask: mask.clone(),
            out: Precomputed::new(out),
        },
    )
}

/// The dtype of the fused CPU kernel when it runs for these operands: all on the CPU, all f32 or
/// all f64.
fn fused_cpu_dtype(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Option<DType> {
    let dtype = q.dtype();
    let same = [k, v, mask].iter().all(|t| t.dtype() == dtype);
    (q.device().is_cpu() && same && matches!(dtype, DType::F32 | DType::F64)).then_some(dtype)
}

/// [`attention`] (or [`attention_after_past`]) on the fused CPU kernel in `dtype`, timed: with
/// bf16 products where the scoring asks for them, the activations are f32, nothing tracks
/// gradients and the CPU has a bf16 kernel.
fn fused(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    shape: Shapes,
    dtype: DType,
) -> Result<Tensor> {
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let bf16 = (shape.scoring.bf16_products && dtype == DType::F32 && !tracked)
        .then(super::amx::bf16_kernel)
        .flatten();
    let flops = 4 * shape.scores() * k.dim(3)?;
    timed(Phase::Attention, flops, || match (dtype, bf16) {
        (DType::F64, _) => fused_cpu::<f64>(q, k, v, mask, shape),
        (_, Some(kernel)) => fused_cpu_bf16(q, k, v, mask, shape, kernel),
        _ => fused_cpu::<f32>(q, k, v, mask, shape),
    })
}

/// [`attention`] through the fused CPU kernel, with its backward attached when q, k or v track
/// gradients.
fn fused_cpu<T: sdpa_cpu::Element + WithDType>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    shape: Shapes,
) -> Result<Tensor> {
    let dims = shape.cpu_dims(k.dim(3)?);
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mask = mask.contiguous()?;
    let (out, lse) = with_cpu_slices([&q, &k, &v, &mask], |[q, k, v, mask]: [&[T]; 4]| {
        sdpa_cpu::forward(q, k, v, mask, dims)
    })?;
    let out = Tensor::from_vec(out, q.shape(), q.device())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    let rows = q.dim(2)?;
    let lse = Tensor::from_vec(lse, (shape.batch, shape.kv_heads, rows), q.device())?;
    q.apply_op3(
        &k,
        &v,
        FusedCpuAttention {
            dims,
            backward_flops: 8 * shape.scores() * dims.head_dim,
            mask,
            lse,
            out: Precomputed::new(out),
        },
    )
}

/// [`attention`] through the fused CPU kernel with bf16 products (f32 operands, no gradients).
fn fused_cpu_bf16(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    shape: Shapes,
    kernel: super::amx::Bf16Kernel,
) -> Result<Tensor> {
    let dims = shape.cpu_dims(k.dim(3)?);
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mask = mask.contiguous()?;
    let out = with_cpu_slices([&q, &k, &v, &mask], |[q, k, v, mask]: [&[f32]; 4]| {
        sdpa_cpu::forward_bf16(q, k, v, mask, dims, kernel)
    })?;
    Tensor::from_vec(out, q.shape(), q.device())
}

/// Re-attaches the fused kernel's output to q, k and v; its backward is the fused backward.
struct FusedCpuAttention {
    dims: sdpa_cpu::Dims,
    /// Floating-point work of the backward's four products, for the phase profile.
    backward_flops: usize,
    mask: Tensor,
    /// Each query row's log-sum-exp [batch, kv_heads, groups·seq].
    lse: Tensor,
    out: Precomputed,
}

impl FusedCpuAttention {
    fn gradients<T: sdpa_cpu::Element + WithDType>(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = (q.detach(), k.detach(), v.detach());
        let (out, grad) = (out.detach().contiguous()?, grad.detach().contiguous()?);
        let tensors = [&q, &k, &v, &self.mask, &out, &self.lse, &grad];
        let (dq, dk, dv) =
            with_cpu_slices(tensors, |[q, k, v, mask, out, lse, grad]: [&[T]; 7]| {
                sdpa_cpu::backward(q, k, v, mask, out, lse, grad, self.dims)
            })?;
        let device = q.device();
        Ok((
            Tensor::from_vec(dq, q.shape(), device)?,
            Tensor::from_vec(dk, k.shape(), device)?,
            Tensor::from_vec(dv, v.shape(), device)?,
        ))
    }
}

impl CustomOp3 for FusedCpuAttention {
    fn name(&self) -> &'static str {
        "fused-cpu-attention"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        _lq: &Layout,
        _k: &CpuStorage,
        _lk: &Layout,
        _v: &CpuStorage,
        _lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = timed(Phase::Attention, self.backward_flops, || match q.dtype() {
            DType::F64 => self.gradients::<f64>(q, k, v, out, grad),
            _ => self.gradients::<f32>(q, k, v, out, grad),
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// Attention of new tokens to cached and new keys, without gradients: q [batch, kv_heads,
/// groups·t, d] (t new positions), k, v [batch, kv_heads, slots, d], mask [batch, 1, t, slots]
/// in the softmax dtype, the new positions' slots last. On the CPU (f32 or f64) this is the fused
/// kernel's forward with the cached keys before each block's own; elsewhere all t new rows' scores
/// are computed at once (they are few: one per step in generation). Returns [batch, kv_heads,
/// groups·t, d].
pub fn attention_after_past(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scoring: Scoring,
) -> Result<Tensor> {
    let shape = Shapes::after_past(q, k, mask, scoring)?;
    if let Some(dtype) = fused_cpu_dtype(q, k, v, mask) {
        return fused(&q.detach(), &k.detach(), &v.detach(), mask, shape, dtype);
    }
    timed(Phase::Attention, 4 * q.elem_count() * k.dim(2)?, || {
        matmul(
            &probabilities(q, k, mask, scoring, false)?
                .0
                .to_dtype(v.dtype())?,
            v,
        )
    })
}

/// softmax(scoring(q·kᵀ) + mask) for q [batch, kv_heads, groups·len, d] (`groups` query heads
/// per K/V head stacked along the rows), k [batch, kv_heads, keys, d] and mask [batch, 1, len,
/// keys]: [batch, kv_heads, groups·len, keys], in the mask's dtype; with `slopes`, also the
/// derivative of a capped score's cap, in the same layout.
fn probabilities(
    q: &Tensor,
    k: &Tensor,
    mask: &Tensor,
    scoring: Scoring,
    slopes: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (b, kvh, keys, _) = k.dims4()?;
    let len = mask.dim(2)?;
    let g = q.dim(2)? / len;
    let (scores, slope) = scoring.scores(q, k, mask.dtype(), slopes)?;
    let scores = scores
        .reshape((b, kvh * g, len, keys))?
        .broadcast_add(mask)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.reshape((b, kvh, g * len, keys))?;
    Ok((probs, slope))
}

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Shapes {
    batch: usize,
    kv_heads: usize,
    groups: usize,
    seq: usize,
    /// Cached keys before the queries' own (inference with a KV cache; 0 otherwise).
    past: usize,
    block: usize,
    scoring: Scoring,
}

impl Shapes {
    /// The fused CPU kernel's sizes for heads of `head_dim`.
    fn cpu_dims(&self, head_dim: usize) -> sdpa_cpu::Dims {
        sdpa_cpu::Dims {
            kv_heads: self.kv_heads,
            groups: self.groups,
            seq: self.seq,
            past: self.past,
            head_dim,
            block: self.block,
            scale: self.scoring.scale,
            softcap: self.scoring.softcap,
        }
    }

    fn of(q: &Tensor, k: &Tensor, block: usize, scoring: Scoring) -> Result<Self> {
        let (batch, kv_heads, seq, _) = k.dims4()?;
        let rows = q.dim(2)?;
        if seq == 0 || rows % seq != 0 {
            candle_core::bail!("attention: {rows} query rows do not fit {seq} key positions");
        }
        Ok(Self {
            batch,
            kv_heads,
            groups: rows / seq,
            seq,
            past: 0,
            block: block.clamp(1, seq),
            scoring,
        })
    }

    /// The sizes of new tokens' attention after a KV cache: q [batch, kv_heads, groups·t, d],
    /// k [batch, kv_heads, slots, d] with the t new positions last, mask [batch, 1, t, slots].
    fn after_past(q: &Tensor, k: &Tensor, mask: &Tensor, scoring: Scoring) -> Result<Self> {
        let (batch, kv_heads, slots, _) = k.dims4()?;
        let (t, rows) = (mask.dim(2)?, q.dim(2)?);
        if t == 0 || rows % t != 0 || t > slots || mask.dim(3)? != slots {
            candle_core::bail!(
                "attention: {rows} query rows and a mask of {:?} do not fit {slots} key positions",
                mask.dims()
            );
        }
        let groups = rows / t;
        Ok(Self {
            batch,
            kv_heads,
            groups,
            seq: t,
            past: slots - t,
            block: block_rows(batch, kv_heads * groups, t),
            scoring,
        })
    }

    /// Query-key pairs scored over all blocks (each block sees the keys up to its last row).
    fn scores(&self) -> usize {
        let pairs: usize = self
            .blocks()
            .map(|(start, len)| len * (self.past + start + len))
            .sum();
        self.batch * self.kv_heads * self.groups * pairs
    }

    /// The start and length of each block of query positions.
    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> {
        blocks::ranges(self.seq, self.block)
    }

    /// The rows of x [batch, kv_heads, groups·seq, n] at positions start..start+len.
    fn rows(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        if len == self.seq {
            return Ok(x.clone());
        }
        let n = x.dim(3)?;
        let (b, h, g) = (self.batch, self.kv_heads, self.groups);
        x.reshape((b, h, g, self.seq, n))?
            .narrow(3, start, len)?
            .reshape((b, h, g * len, n))
    }

    /// Puts blocks of rows back together (the inverse of [`Shapes::rows`]).
    fn join(&self, mut blocks: Vec<Tensor>) -> Result<Tensor> {
        if blocks.len() == 1 {
            if let Some(only) = blocks.pop() {
                return Ok(only);
            }
        }
        let (b, h, g) = (self.batch, self.kv_heads, self.groups);
        let parts = blocks
            .iter()
            .map(|x| {
                let (rows, n) = (x.dim(2)?, x.dim(3)?);
                x.reshape((b, h, g, rows / g, n))
            })
            .collect::<Result<Vec<_>>>()?;
        let n = parts.first().map(|p| p.dim(4)).transpose()?.unwrap_or(0);
        Tensor::cat(&parts, 3)?.reshape((b, h, g * self.seq, n))
    }

    /// The attention probabilities of one block, [batch, kv_heads, groups·len, start + len], in
    /// the mask's dtype: the keys up to the block's last query position, the only ones a causal
    /// mask lets it see (later keys would only add exp(−∞) = 0). With `slopes`, also the
    /// derivative of the score cap.
    fn probs(
        &self,
        q_rows: &Tensor,
        k: &Tensor,
        mask: &Tensor,
        (start, len): (usize, usize),
        slopes: bool,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let keys = start + len;
        let mask = mask.narrow(2, start, len)?.narrow(3, 0, keys)?;
        probabilities(q_rows, &k.narrow(2, 0, keys)?, &mask, self.scoring, slopes)
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let blocks = self
            .blocks()
            .map(|(start, len)| {
                let (p, _) =
                    self.probs(&self.rows(q, start, len)?, k, mask, (start, len), false)?;
                matmul(&p.to_dtype(v.dtype())?, &v.narrow(2, 0, start + len)?)
            })
            .collect::<Result<Vec<_>>>()?;
        self.join(blocks)
    }

    /// Gradients of q, k and v for the output gradient `grad`; dK and dV sum over blocks in the
    /// softmax dtype.
    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let acc = mask.dtype();
        let scale = self.scoring.scale;
        let (mut dq, mut dk, mut dv) = (
            Vec::new(),
            k.zeros_like()?.to_dtype(acc)?,
            v.zeros_like()?.to_dtype(acc)?,
        );
        for (start, len) in self.blocks() {
            let q_rows = self.rows(q, start, len)?;
            let grad_rows = self.rows(grad, start, len)?;
            let (p, slope) = self.probs(&q_rows, k, mask, (start, len), true)?;
            let (keys, later) = (start + len, self.seq - start - len);
            let (k_seen, v_seen) = (k.narrow(2, 0, keys)?, v.narrow(2, 0, keys)?);
            let dv_seen = matmul(&p.to_dtype(v.dtype())?.t()?, &grad_rows)?.to_dtype(acc)?;
            dv = (dv + dv_seen.pad_with_zeros(2, 0, later)?)?;
            let dp = matmul(&grad_rows, &v_seen.t()?)?.to_dtype(acc)?;
            let row_dot = (&p * &dp)?.sum_keepdim(D::Minus1)?;
            let mut ds = ((p * dp.broadcast_sub(&row_dot)?)? * scale)?;
            if let Some(slope) = slope {
                ds = (ds * slope)?;
            }
            let ds = ds.to_dtype(q.dtype())?;
            dq.push(matmul(&ds, &k_seen)?);
            let dk_seen = matmul(&ds.t()?, &q_rows)?.to_dtype(acc)?;
            dk = (dk + dk_seen.pad_with_zeros(2, 0, later)?)?;
        }
        Ok((
            self.join(dq)?,
            dk.to_dtype(k.dtype())?,
            dv.to_dtype(v.dtype())?,
        ))
    }
}

/// Re-attaches the output computed outside the graph to q, k and v; its backward recomputes.
struct BlockwiseAttention {
    shape: Shapes,
    mask: Tensor,
    out: Precomputed,
}

impl CustomOp3 for BlockwiseAttention {
    fn name(&self) -> &'static str {
        "blockwise-attention"
    }

    fn cpu_fwd(
        &self,
        _q: &CpuStorage,
        _lq: &Layout,
        _k: &CpuStorage,
        _lk: &Layout,
        _v: &CpuStorage,
        _lv: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.out.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _q: &candle_core::CudaStorage,
        _lq: &Layout,
        _k: &candle_core::CudaStorage,
        _lk: &Layout,
        _v: &candle_core::CudaStorage,
        _lv: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.cuda()
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flops = 10 * self.shape.scores() * k.dim(3)?;
        let (dq, dk, dv) = timed(Phase::Attention, flops, || {
            self.shape.backward(
                &q.detach(),
                &k.detach(),
                &v.detach(),
                &self.mask,
                &grad.detach().contiguous()?,
            )
        })?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
