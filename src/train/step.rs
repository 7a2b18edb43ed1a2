//! One optimizer step: forward/backward over the accumulated micro-batches, gradient clipping, AdamW;
//! and the steps of a run, each at its scheduled learning rate.

use anyhow::{bail, Result};
use candle_core::{Tensor, Var};

use super::loss::summed_nll;
use super::optim::{self, AdamW, AdamWParams};
use super::schedule;
use crate::data::Batch;
use crate::model::phases::{timed, Phase};
use crate::model::CausalLm;
use crate::recipe::TrainSection;

/// What one optimizer step measured.
#[derive(Debug, Clone, Copy)]
pub struct StepOutcome {
    /// Mean loss per target token over all micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step applied.
    pub lr: f64,
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
    // A variable without gradient (no micro-batch of the step had a target) keeps None: AdamW skips it.
    let grad_norm = timed(Phase::Optimizer, 0, || -> Result<f64> {
        let grad_norm = optim::global_norm(&grads)?;
        let grads = optim::clip(grads, grad_norm, max_grad_norm)?;
        optimizer.step(&grads, lr)?;
        Ok(grad_norm)
    })?;
    Ok(StepOutcome {
        loss: loss_sum,
        grad_norm,
        lr,
        tokens,
    })
}

/// The optimizer side of a run: AdamW with the `[train]` settings over the trainable variables,
/// stepped through the learning-rate schedule of `total_steps` steps.
pub struct Optimization {
    trainable: Vec<(String, Var)>,
    optimizer: AdamW,
    train: TrainSection,
    total_steps: usize,
    /// The 0-based index of the next step: the schedule's `current_step`, as transformers' schedulers
    /// count (the first step runs at lr 0 during warm-up), and the step that seeds LoRA dropout.
    next: usize,
}

impl Optimization {
    pub fn new(
        trainable: Vec<(String, Var)>,
        train: &TrainSection,
        total_steps: usize,
    ) -> Result<Self> {
        let params = AdamWParams {
            beta1: train.adam_beta1,
            beta2: train.adam_beta2,
            eps: train.adam_eps,
            weight_decay: train.weight_decay,
        };
        let vars = trainable.iter().map(|(_, v)| v.clone()).collect();
        Ok(Self {
            optimizer: AdamW::new(vars, params)?,
            trainable,
            train: train.clone(),
            total_steps,
            next: 0,
        })
    }

    /// Runs the next optimizer step on `batches` (the micro-batches it accumulates).
    pub fn step(&mut self, lm: &CausalLm, batches: &[Batch]) -> Result<StepOutcome> {
        let t = &self.train;
        let lr = schedule::lr_at(
            t.lr_schedule,
            t.lr,
            self.next,
            t.warmup_steps,
            self.total_steps,
        );
        let outcome = optimizer_step(
            lm,
            &self.trainable,
            &mut self.optimizer,
            batches,
            lr,
            t.max_grad_norm,
            self.next as u64,
        )?;
        self.next += 1;
        Ok(outcome)
    }
}
