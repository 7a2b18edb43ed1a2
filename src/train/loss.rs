//! Causal-LM cross-entropy: position i predicts token i+1; labels equal to -100 take no loss.

use anyhow::Result;
use candle_core::Tensor;

use crate::data::{Batch, IGNORE_INDEX};
use crate::model::CausalLm;

/// The summed negative log-likelihood over the batch's target tokens, and their count.
/// Only the rows that have a target go through the LM head.
pub fn summed_nll(model: &CausalLm, batch: &Batch, step: Option<u64>) -> Result<(Tensor, usize)> {
    let (b, t) = batch.input_ids.dims2()?;
    let mut rows = Vec::new();
    let mut targets = Vec::new();
    for r in 0..b {
        for i in 0..t.saturating_sub(1) {
            let label = batch.labels[r * t + i + 1];
            if label != IGNORE_INDEX {
                rows.push((r * t + i) as u32);
                targets.push(label as u32);
            }
        }
    }
    let device = model.device();
    if rows.is_empty() {
        return Ok((Tensor::zeros((), candle_core::DType::F32, device)?, 0));
    }
    let hidden = model.hidden_states(&batch.input_ids, &batch.layout, step)?;
    let hidden = hidden.reshape((b * t, model.config.hidden_size))?;
    let n = rows.len();
    let picked = hidden.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
    let targets = Tensor::from_vec(targets, n, device)?;
    let nll = model.target_nll(&picked, &targets)?.sum_all()?;
    Ok((nll, n))
}
