//! The LM head's cross-entropy: the negative log-likelihood of each row's target token, computed
//! in blocks of rows so that only one block's logits [rows, vocab] exist at a time. At a 128k
//! vocabulary the full logits of an 8 × 512 batch are 2 GB in f32, and a composed log-softmax
//! keeps several such tensors for its backward. Here, as in Liger's fused linear cross-entropy, the
//! forward pass also computes each row's gradient direction softmax·W − W[target] (a [rows, hidden]
//! tensor), so the backward is one multiplication and nothing of vocabulary size outlives a block.
//! Log-sum-exp and softmax run in f32 (f64 for f64 models) whatever the model's dtype; on the CPU
//! they are one vectorised pass per row over f32 logits. Without gradients no logits are stored
//! at all: on AMX tiles each block of them is folded into running row statistics as it leaves the
//! tiles, elsewhere (the AVX512_BF16 kernel, f32 products) each panel of vocabulary columns while
//! it is in cache. Soft-capped logits
//! (Gemma 2's cap·tanh(logit/cap)) carry the cap's slope 1 − tanh² into the direction. Eval's log-probabilities of chosen tokens ([`target_logprobs`]) take the same
//! row passes over logits it has computed.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use super::accumulation_dtype;
use super::blocks;
use super::frozen_weight::FrozenWeight;
use super::matmul::{cpu_product_f32, matmul_wide, weight_kernel};
use super::phases::{timed, Phase};
use super::precomputed::Precomputed;
use super::vector_math;
use rayon::prelude::*;

/// Bytes of logits (in f32) that one block may hold; blocks split the rows evenly.
const BLOCK_BYTES: usize = 256 << 20;

/// Rows per block for `rows` targets over a vocabulary of `vocab`: all of them when they fit.
pub fn block_rows(rows: usize, vocab: usize) -> usize {
    blocks::even_block(rows, vocab * 4, BLOCK_BYTES)
}

/// −log softmax(h·Wᵀ)[target] for hidden states h [n, hidden], the LM head W [vocab, hidden] and
/// targets [n] (u32), in blocks of `block` rows: [n], in f32 (f64 for an f64 model); with
/// `softcap`, the logits are cap·tanh(logit/cap) first. Gradients flow to h only; the head is
/// frozen.
pub fn head_nll(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    block: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let products = if hidden.track_op() { 2 } else { 1 };
    let flops = products * 2 * hidden.elem_count() * head.tensor().dim(0)?;
    timed(Phase::LmHead, flops, || {
        blockwise_nll(hidden, head, targets, block, softcap)
    })
}

/// The body of [`head_nll`].
fn blockwise_nll(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    block: usize,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let rows = hidden.dim(0)?;
    let acc = accumulation_dtype(hidden.dtype());
    let with_grad = hidden.track_op();
    let (mut nll, mut direction) = (Vec::new(), Vec::new());
    for (start, len) in blocks::ranges(rows, block) {
        let (n, d) = block_loss(
            &hidden.detach().narrow(0, start, len)?,
            head,
            &targets.narrow(0, start, len)?,
            (acc, softcap),
            with_grad,
        )?;
        nll.push(n);
        direction.extend(d);
    }
    let nll = Tensor::cat(&nll, 0)?;
    if !with_grad {
        return Ok(nll);
    }
    hidden.apply_op3(
        head.tensor(),
        targets,
        HeadNll {
            direction: Tensor::cat(&direction, 0)?,
            nll: Precomputed::new(nll),
        },
    )
}

/// One block's losses [len] and, `with_grad`, their gradient directions softmax·W − W[target]
/// [len, hidden] (dL/dh of a row is its loss gradient times its direction); capped logits weigh
/// each vocabulary row of W by its slope 1 − tanh².
fn block_loss(
    hidden: &Tensor,
    frozen_head: &FrozenWeight,
    targets: &Tensor,
    (acc, softcap): (DType, Option<f64>),
    with_grad: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    if !with_grad {
        if let Some(nll) = folded_nll(hidden, frozen_head, targets, softcap)? {
            return Ok((nll, None));
        }
        if let Some(nll) = panel_folded_nll(hidden, frozen_head, targets, softcap)? {
            return Ok((nll, None));
        }
    }
    if let Some(logits) = frozen_head.transposed_product_f32(hidden)? {
        return cpu_block_loss(logits, hidden, frozen_head, targets, (softcap, with_grad));
    }
    let head = frozen_head.tensor();
    let mut logits = matmul_wide(hidden, &head.t()?)?;
    let mut slope = None;
    if let Some(cap) = softcap {
        (logits, slope) = super::softcap::tensor(&logits, cap, true)?;
    }
    let max = logits.max_keepdim(D::Minus1)?;
    let exp = logits.broadcast_sub(&max)?.exp()?;
    let sum = exp.sum_keepdim(D::Minus1)?;
    let target_logit = logits.gather(&targets.unsqueeze(1)?, 1)?;
    let nll = ((sum.log()? + max)? - target_logit)?.squeeze(1)?;
    if !with_grad {
        return Ok((nll, None));
    }
    let mut probs = exp.broadcast_div(&sum)?;
    let mut chosen = head.index_select(targets, 0)?.to_dtype(acc)?;
    if let Some(slope) = slope {
        chosen = chosen.broadcast_mul(&slope.gather(&targets.unsqueeze(1)?, 1)?)?;
        probs = (probs * slope)?;
    }
    let expected = matmul_wide(&probs.to_dtype(hidden.dtype())?, head)?;
    Ok((nll, Some((expected - chosen)?)))
}

/// [`block_loss`] on the CPU for f32 logits: one pass per row (in parallel) caps the logits when
/// `softcap`, computes the maximum, the exponentials and the loss, and, `with_grad`, turns the row
/// into its softmax (times the cap's slopes) in place.
fn cpu_block_loss(
    mut logits: Vec<f32>,
    hidden: &Tensor,
    frozen_head: &FrozenWeight,
    targets: &Tensor,
    (softcap, with_grad): (Option<f64>, bool),
) -> Result<(Tensor, Option<Tensor>)> {
    let head = frozen_head.tensor();
    let vocab = head.dim(0)?;
    let ids = target_ids(targets, vocab)?;
    let cap = softcap.map(|c| c as f32);
    // Each row's slopes of the cap (one unused element per row without a cap).
    let slope_width = if cap.is_some() { vocab } else { 1 };
    let mut slopes = vec![0f32; ids.len() * slope_width];
    let (nll, target_slopes): (Vec<f32>, Vec<f32>) = logits
        .par_chunks_mut(vocab)
        .zip(ids.par_iter())
        .zip(slopes.par_chunks_mut(slope_width))
        .map(|((row, &target), slope)| {
            if let Some(cap) = cap {
                super::softcap::row(row, cap, Some(slope));
            }
            let target_logit = row[target as usize];
            let max = vector_math::max(row);
            let sum = vector_math::exp_shifted_sum(row, max);
            let mut target_slope = 1.0;
            if with_grad {
                vector_math::scale(row, 1.0 / sum);
                if cap.is_some() {
                    row.iter_mut().zip(slope.iter()).for_each(|(p, s)| *p *= *s);
                    target_slope = slope[target as usize];
                }
            }
            ((sum.ln() + max) - target_logit, target_slope)
        })
        .unzip();
    let device = hidden.device();
    let nll = Tensor::from_vec(nll, ids.len(), device)?;
    if !with_grad {
        return Ok((nll, None));
    }
    let probs = Tensor::from_vec(logits, (ids.len(), vocab), device)?;
    let expected = frozen_head.times(&probs)?.to_dtype(DType::F32)?;
    let mut chosen = head.index_select(targets, 0)?.to_dtype(DType::F32)?;
    if cap.is_some() {
        let target_slopes = Tensor::from_vec(target_slopes, (ids.len(), 1), device)?;
        chosen = chosen.broadcast_mul(&target_slopes)?;
    }
    Ok((nll, Some((expected - chosen)?)))
}

/// The target ids [n], each checked to lie inside a vocabulary of `vocab`.
fn target_ids(targets: &Tensor, vocab: usize) -> Result<Vec<u32>> {
    let ids = targets.to_vec1::<u32>()?;
    check_in_vocabulary(&ids, vocab)?;
    Ok(ids)
}

/// An error naming the first id of `ids` outside a vocabulary of `vocab`.
fn check_in_vocabulary<'a>(ids: impl IntoIterator<Item = &'a u32>, vocab: usize) -> Result<()> {
    match ids.into_iter().find(|&&t| t as usize >= vocab) {
        Some(bad) => candle_core::bail!("target id {bad} is outside the vocabulary of {vocab}"),
        None => Ok(()),
    }
}

/// Log-probabilities of chosen tokens under softmax(logits), for logits [rows, vocab] (f32, or
/// f64 for an f64 model) and the tokens asked of each row (the choices of a question may all be
/// scored from one position): per row, each token's log-probability (in f32) and whether it is the
/// argmax (the first largest logit). One pass per row in parallel finds the maximum and sums the
/// exponentials; no other [rows, vocab] tensor is made.
pub fn target_logprobs(logits: &Tensor, targets: &[Vec<u32>]) -> Result<Vec<Vec<(f32, bool)>>> {
    let vocab = logits.dim(1)?;
    check_in_vocabulary(targets.iter().flatten(), vocab)?;
    match logits.dtype() {
        DType::F64 => Ok(rows_logprobs(
            logits.flatten_all()?.to_vec1::<f64>()?,
            vocab,
            targets,
        )),
        _ => Ok(rows_logprobs(
            logits
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            vocab,
            targets,
        )),
    }
}

/// The body of [`target_logprobs`] on the logits' values.
fn rows_logprobs<T: vector_math::SoftmaxRow + num_traits::Float + Send + Sync>(
    mut logits: Vec<T>,
    vocab: usize,
    targets: &[Vec<u32>],
) -> Vec<Vec<(f32, bool)>> {
    logits
        .par_chunks_mut(vocab.max(1))
        .zip(targets.par_iter())
        .map(|(row, wanted)| {
            let max = T::row_max(row);
            let shifted: Vec<(T, bool)> = wanted
                .iter()
                .map(|&t| {
                    let logit = row[t as usize];
                    let first_max = logit == max && !row[..t as usize].contains(&max);
                    (logit - max, first_max)
                })
                .collect();
            let log_sum = T::exp_shifted_sum(row, max).ln();
            shifted
                .into_iter()
                .map(|(x, greedy)| ((x - log_sum).to_f32().unwrap_or(f32::NAN), greedy))
                .collect()
        })
        .collect()
}

/// One row's softmax statistics over the vocabulary columns one thread computed: the largest
/// logit, the sum of exp(logit − largest), and the target's logit where it was among them.
#[derive(Clone, Copy)]
struct RowPartial {
    max: f32,
    sum: f32,
    target: Option<f32>,
}

impl RowPartial {
    /// Before any column.
    const EMPTY: Self = Self {
        max: f32::NEG_INFINITY,
        sum: 0.0,
        target: None,
    };

    /// Takes in this row's logits of the columns from `first_col` on (capped first when `cap`;
    /// the slice is scratch: it is overwritten), for the target column `target`.
    fn fold(&mut self, logits: &mut [f32], first_col: usize, target: usize, cap: Option<f32>) {
        if let Some(cap) = cap {
            super::softcap::row(logits, cap, None);
        }
        if (first_col..first_col + logits.len()).contains(&target) {
            self.target = Some(logits[target - first_col]);
        }
        let block_max = vector_math::max(logits);
        if block_max > self.max {
            self.sum *= (self.max - block_max).exp();
            self.max = block_max;
        }
        self.sum += vector_math::exp_shifted_sum(logits, self.max);
    }

    /// The row's loss, log Σ exp − the target's logit (NaN where no column held the target).
    fn nll(&self) -> f32 {
        (self.sum.ln() + self.max) - self.target.unwrap_or(f32::NAN)
    }
}

/// Vocabulary columns per panel of [`panel_folded_nll`]: faer's product of the head is as fast
/// in panels of 512 to 1,024 columns as whole (see `matmul`'s `WIDE_PANEL`).
const FOLD_PANEL: usize = 1024;

/// The losses without gradients where the head's product runs in f32 (f32 weights, or half ones
/// widened where a panel's product takes no bf16 kernel, as [`weight_kernel`] decides): the logits of a panel of [`FOLD_PANEL`] vocabulary
/// columns at a time for all rows, each row's part folded into its running statistics while the
/// panel is in cache. The stored path writes [rows, vocab] logits and reads them back from
/// memory. None elsewhere.
fn panel_folded_nll(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    let w = head.tensor();
    let (vocab, width) = w.dims2()?;
    let panel_kernel = weight_kernel(hidden.dim(0)?, width, FOLD_PANEL.min(vocab), true);
    let f32_product = match w.dtype() {
        DType::F32 => true,
        DType::BF16 | DType::F16 => panel_kernel.is_none(),
        _ => false,
    };
    if !f32_product || !hidden.device().is_cpu() || hidden.dtype() != DType::F32 {
        return Ok(None);
    }
    let ids = target_ids(targets, vocab)?;
    let cap = softcap.map(|c| c as f32);
    let mut rows = vec![RowPartial::EMPTY; ids.len()];
    for first in (0..vocab).step_by(FOLD_PANEL) {
        let cols = FOLD_PANEL.min(vocab - first);
        let Some(mut logits) = cpu_product_f32(hidden, &w.narrow(0, first, cols)?.t()?)? else {
            return Ok(None);
        };
        logits
            .par_chunks_mut(cols)
            .zip(rows.par_iter_mut())
            .zip(ids.par_iter())
            .for_each(|((row, stats), &target)| stats.fold(row, first, target as usize, cap));
    }
    let nll: Vec<f32> = rows.iter().map(RowPartial::nll).collect();
    Ok(Some(Tensor::from_vec(nll, ids.len(), hidden.device())?))
}

/// The losses without gradients on a bf16 kernel, with no logits stored: each thread folds every
/// block of logits it computes into running row statistics (an online log-sum-exp, capped first
/// when `softcap`) while the block is in cache (32 × 32 from the AMX tiles, 32 rows × 512
/// columns from the AVX512_BF16 kernel), and the threads' statistics combine at the end. The
/// stored path writes [rows, vocab] f32 logits (200 MB for 1,024 rows of a 49,152 vocabulary)
/// and reads them again. None where the head's product does not run on a bf16 kernel.
fn folded_nll(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    softcap: Option<f64>,
) -> Result<Option<Tensor>> {
    let vocab = head.tensor().dim(0)?;
    let ids = target_ids(targets, vocab)?;
    let cap = softcap.map(|c| c as f32);
    let partials = head.transposed_product_folded(
        hidden,
        || vec![RowPartial::EMPTY; ids.len()],
        |rows, mut block| {
            let (first_row, first_col) = (block.first_row, block.first_col);
            for (r, row) in block.rows_mut().enumerate() {
                let target = ids[first_row + r] as usize;
                rows[first_row + r].fold(row, first_col, target, cap);
            }
        },
    )?;
    let Some(partials) = partials else {
        return Ok(None);
    };
    let nll: Vec<f32> = (0..ids.len())
        .map(|i| {
            let max = partials
                .iter()
                .fold(f32::NEG_INFINITY, |m, p| m.max(p[i].max));
            let sum: f32 = partials
                .iter()
                .map(|p| p[i].sum * (p[i].max - max).exp())
                .sum();
            let target = partials.iter().find_map(|p| p[i].target);
            RowPartial { max, sum, target }.nll()
        })
        .collect();
    Ok(Some(Tensor::from_vec(nll, ids.len(), hidden.device())?))
}

/// Re-attaches the per-row losses computed outside the graph to the hidden states.
struct HeadNll {
    /// softmax·W − W[target] per row, in the accumulation dtype.
    direction: Tensor,
    nll: Precomputed,
}

impl CustomOp3 for HeadNll {
    fn name(&self) -> &'static str {
        "lm-head-nll"
    }

    fn cpu_fwd(
        &self,
        _h: &CpuStorage,
        _lh: &Layout,
        _w: &CpuStorage,
        _lw: &Layout,
        _t: &CpuStorage,
        _lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.nll.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _h: &candle_core::CudaStorage,
        _lh: &Layout,
        _w: &candle_core::CudaStorage,
        _lw: &Layout,
        _t: &candle_core::CudaStorage,
        _lt: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.nll.cuda()
    }

    fn bwd(
        &self,
        hidden: &Tensor,
        _head: &Tensor,
        _targets: &Tensor,
        _nll: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = grad
            .detach()
            .to_dtype(self.direction.dtype())?
            .unsqueeze(1)?;
        let dh = self.direction.broadcast_mul(&g)?.to_dtype(hidden.dtype())?;
        Ok((Some(dh), None, None))
    }
}
