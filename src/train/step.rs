//! One optimizer step: forward/backward over the accumulated micro-batches, gradient clipping, AdamW;
//! and the steps of a run, each at its scheduled learning rate.

use anyhow::{anyhow, Result};
use candle_core::{Tensor, Var};

use super::loss::summed_nll;
use super::optim::{self, AdamW, AdamWParams};
use super::schedule;
use crate::data::Batch;
use crate::model::kernels::phases::{timed, Phase};
use crate::model::CausalLm;
use crate::recipe::TrainSection;

/// What one optimizer step measured.
#[derive(Debug, Clone)]
pub struct StepOutcome {
    /// Mean loss per target token over all micro-batches.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// The learning rate the step applied.
    pub lr: f64,
    /// Non-padding tokens processed.
    pub tokens: usize,
    /// The update was skipped because the loss or the gradients were not finite
    /// (`skip_nonfinite`): what was not finite.
    pub skipped: Option<String>,
}

/// A loss or gradient norm that is NaN or infinite, naming where.
fn nonfinite(what: String, step: u64) -> anyhow::Error {
    anyhow!(
        "{what} at step {}: lower [train] lr, check the data, or set [train] skip_nonfinite = true to skip such updates",
        step + 1
    )
}

/// Accumulates gradients over `batches` (normalised by their total target count, so the step equals
/// one large batch), clips them to `max_grad_norm` and applies AdamW at `lr`. A loss or gradient
/// that is not finite is an error naming the step and micro-batch, or, with `skip_nonfinite`, an
/// update that is skipped.
#[allow(clippy::too_many_arguments)]
pub fn optimizer_step(
    lm: &CausalLm,
    trainable: &[(String, Var)],
    optimizer: &mut AdamW,
    batches: &[Batch],
    lr: f64,
    max_grad_norm: f64,
    step: u64,
    skip_nonfinite: bool,
) -> Result<StepOutcome> {
    let targets: usize = batches.iter().map(|b| b.target_tokens).sum();
    let mut grads: Vec<Option<Tensor>> = vec![None; trainable.len()];
    let (mut loss_sum, mut tokens) = (0f64, 0usize);
    let mut side = std::collections::HashMap::new();
    for (k, batch) in batches.iter().enumerate() {
        tokens += batch.tokens;
        let (nll, _) = summed_nll(lm, batch, Some(step))?;
        let loss = (nll / targets.max(1) as f64)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            let what = format!(
                "the loss of micro-batch {} of {} is {value}",
                k + 1,
                batches.len()
            );
            if !skip_nonfinite {
                return Err(nonfinite(what, step));
            }
            lm.take_checkpoint_grads();
            return Ok(StepOutcome {
                loss: value,
                grad_norm: f64::NAN,
                lr,
                tokens,
                skipped: Some(what),
            });
        }
        loss_sum += value;
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
    // A variable without gradient (no micro-batch of the step had a target) keeps None: AdamW skips it.
    let grad_norm = optim::global_norm(&grads)?;
    if !grad_norm.is_finite() {
        let what = format!("the gradient norm is {grad_norm}");
        if !skip_nonfinite {
            return Err(nonfinite(what, step));
        }
        return Ok(StepOutcome {
            loss: loss_sum,
            grad_norm,
            lr,
            tokens,
            skipped: Some(what),
        });
    }
    timed(Phase::Optimizer, 0, || -> Result<()> {
        let grads = optim::clip(grads, grad_norm, max_grad_norm)?;
        optimizer.step(&grads, lr)
    })?;
    Ok(StepOutcome {
        loss: loss_sum,
        grad_norm,
        lr,
        tokens,
        skipped: None,
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
            t.skip_nonfinite,
        )?;
        self.next += 1;
        Ok(outcome)
    }

    /// The number of steps taken.
    pub fn steps_taken(&self) -> usize {
        self.next
    }

    /// The AdamW state, for a checkpoint.
    pub fn optimizer(&self) -> &AdamW {
        &self.optimizer
    }

    /// Continues after `steps_taken` steps with the optimizer state of a checkpoint.
    pub fn resume(
        &mut self,
        steps_taken: usize,
        m: Vec<Tensor>,
        v: Vec<Tensor>,
        counts: Vec<i32>,
    ) -> Result<()> {
        self.optimizer.restore(m, v, counts)?;
        self.next = steps_taken;
        Ok(())
    }
}
