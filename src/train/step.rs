//! One optimizer step: forward/backward over the accumulated micro-batches, gradient clipping, AdamW.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use super::loss::summed_nll;
use super::optim::{self, AdamW};
use crate::data::Batch;
use crate::model::phases::{timed, Phase};
use crate::model::CausalLm;

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Mean loss per target token over all micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Non-padding tokens processed.
    pub tokens: usize,
}

/// Accumulates gradients over `batches` (normalised by their total target count, so the step equals
/// one large batch), clips them to `max_grad_norm` and applies AdamW at `lr`.
pub fn optimizer_step(
    lm: &CausalLm,
    trainable: &[(String, Var)],
    optimizer: &mut AdamW,
    batches: &[Batch],
    lr: f64,
    max_grad_norm: f64,
    step: u64,
) -> Result<StepOutcome> {
    let targets: usize = batches.iter().map(|b| b.target_tokens).sum();
    let mut grads: Vec<Option<Tensor>> = vec![None; trainable.len()];
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    let mut side = std::collections::HashMap::new();
    for batch in batches {
        tokens += batch.tokens;
        let (nll, _) = summed_nll(lm, batch, Some(step))?;
        let loss = (nll / targets.max(1) as f64)?;
        loss_sum += loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let store = loss.backward()?;
        for (id, g) in lm.take_checkpoint_grads() {
            let sum = match side.remove(&id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            side.insert(id, sum);
        }
        for (slot, (_, var)) in grads.iter_mut().zip(trainable) {
            *slot = match (slot.take(), store.get(var.as_tensor()).cloned()) {
                (Some(a), Some(b)) => Some((a + b)?),
                (a, b) => a.or(b),
            };
        }
    }
    // Checkpointed layers hand their adapters' gradients over on the side.
    for (slot, (_, var)) in grads.iter_mut().zip(trainable) {
        if let Some(g) = side.remove(&var.id()) {
            *slot = match slot.take() {
                Some(a) => Some((a + g)?),
                None => Some(g),
            };
        }
    }
    if !loss_sum.is_finite() {
        bail!(
            "loss became {loss_sum} at step {}: lower [train] lr or check the data",
            step + 1
        );
    }
    // A variable without gradient (its layer saw no target) gets zeros, as PyTorch's None would leave it.
    let grads = grads
        .into_iter()
        .zip(trainable)
        .map(|(g, (_, v))| g.map(Ok).unwrap_or_else(|| v.zeros_like()))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let grad_norm = timed(Phase::Optimizer, 0, || -> Result<f64> {
        let grad_norm = optim::global_norm(&grads)?;
        let grads = optim::clip(grads, grad_norm, max_grad_norm)?;
        optimizer.step(&grads, lr)?;
        Ok(grad_norm)
    })?;
    Ok(StepOutcome {
        loss: loss_sum,
        grad_norm,
        tokens,
    })
}
