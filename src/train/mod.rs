//! The train stage: LoRA fine-tuning of a base model as a recipe describes it. Reads top to bottom:
//! load → attach adapters → prepare data → loop (accumulate, clip, step, log, validate) → save.

pub mod loss;
pub mod metrics;
pub mod optim;
pub mod schedule;
pub mod step;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

use crate::data::{self, Batch, Example};
use crate::fsutil::{write_atomic, StagedDir};
use crate::model::{adapter, BaseModel, Model};
use crate::recipe::Recipe;
use metrics::{MetricsLog, StepRecord};

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub output: PathBuf,
    pub steps: usize,
    pub first_loss: f64,
    pub last_loss: f64,
    pub val_loss: Option<f64>,
    pub tokens_per_s: f64,
    /// Peak memory of the run on its device (GPU memory, or the process's RSS on the CPU).
    pub peak_memory: Option<crate::device::MemoryPeak>,
}

/// Runs the recipe's training on `base` (see [`Recipe::locate_base`]) and writes the adapter, the
/// resolved recipe and metrics.jsonl.
pub fn run(recipe: &Recipe, base: &BaseModel, force: bool) -> Result<TrainSummary> {
    let t = &recipe.train;
    let device = crate::device::open(&t.device)?;
    let memory = crate::device::PeakMemory::watch(&device);
    let out = StagedDir::create(&recipe.resolve(&recipe.output.dir), force)?;

    let mut model = Model::load(&base.dir, Some(recipe.model.dtype.dtype()), &device)?;
    match &recipe.lora.init_from {
        Some(dir) => {
            model.load_adapter(&recipe.resolve(dir))?;
            let loaded = model.lora.as_ref().map(|l| (l.r, l.alpha));
            if loaded != Some((recipe.lora.r, recipe.lora.alpha)) {
                tracing::warn!(
                    "continuing adapter {dir}: its r and alpha {loaded:?} are used, not [lora]'s"
                );
            }
        }
        None => model.attach_lora(&recipe.lora.to_config(), t.seed)?,
    }
    tracing::info!(
        "model {} ({}, {} parameters) on {}; frozen base in {:?}, LoRA weights, gradients, AdamW state, norms, softmax and loss in f32; LoRA r {} on {} ({} trainable parameters)",
        base.dir.display(),
        model.lm.config.model_type,
        model.lm.config.parameter_count(),
        crate::device::describe(&device),
        recipe.model.dtype,
        model.lora.as_ref().map(|l| l.r).unwrap_or(recipe.lora.r),
        model.adapted_module_names().join(","),
        model.trainable_parameter_count()
    );

    model.lm.gradient_checkpointing = t.gradient_checkpointing;
    let data = data::prepare(recipe, &model.tokenizer)?;
    let r = &data.report;
    tracing::info!(
        "data: {} train / {} validation samples ({} rows read, {} duplicates dropped), {} training rows",
        r.train_samples,
        r.validation_samples,
        r.train_sources.iter().map(|s| s.rows_read).sum::<usize>(),
        r.duplicates_dropped,
        data.train.len()
    );
    if r.truncated > 0 {
        tracing::warn!(
            "{} samples were longer than max_seq_len = {} and were truncated",
            r.truncated,
            recipe.data.max_seq_len
        );
    }

    write_atomic(
        &out.path().join("recipe.resolved.toml"),
        recipe.naming_base(base).to_toml()?.as_bytes(),
    )?;
    let batches_per_epoch = data.train.len().div_ceil(t.batch_size);
    let steps_per_epoch = batches_per_epoch.div_ceil(t.gradient_accumulation).max(1);
    let total_steps = t.max_steps.unwrap_or(steps_per_epoch * t.epochs);
    let mut micro_batches = MicroBatches::new(&data.train, t.batch_size, t.seed);

    let mut optimization = step::Optimization::new(model.trainable(), t, total_steps)?;
    let mut log = MetricsLog::create(&out.path().join("metrics.jsonl"))?;
    let bar = progress_bar(total_steps as u64);
    let pad = model.tokenizer.pad_id();
    let started = Instant::now();
    let (mut first_loss, mut last_loss, mut tokens_seen, mut val_loss) =
        (f64::NAN, f64::NAN, 0usize, None);

    for step in 0..total_steps {
        let group: Vec<Vec<&Example>> = (0..t.gradient_accumulation)
            .map(|_| micro_batches.next())
            .collect();
        let batches = group
            .iter()
            .map(|g| Batch::pad(g, pad, &device))
            .collect::<Result<Vec<_>>>()?;
        let outcome = optimization.step(&model.lm, &batches)?;
        tokens_seen += outcome.tokens;
        let (loss_sum, grad_norm) = (outcome.loss, outcome.grad_norm);
        if step == 0 {
            first_loss = loss_sum;
        }
        last_loss = loss_sum;
        let is_last = step + 1 == total_steps;
        let eval_now = !data.validation.is_empty()
            && (is_last || (t.eval_every > 0 && (step + 1) % t.eval_every == 0));
        let step_val = if eval_now {
            let v = validation_loss(&model, &data.validation, t.batch_size, pad)?;
            val_loss = Some(v);
            Some(v)
        } else {
            None
        };
        let elapsed = started.elapsed().as_secs_f64();
        let record = StepRecord {
            step: step + 1,
            epoch: (step + 1) as f64 / steps_per_epoch as f64,
            loss: loss_sum,
            lr: outcome.lr,
            grad_norm,
            tokens: tokens_seen,
            tokens_per_s: tokens_seen as f64 / elapsed.max(1e-9),
            val_loss: step_val,
        };
        log.write(&record)?;
        bar.set_message(record.progress_message());
        bar.inc(1);
    }
    bar.finish();
    let tokens_per_s = tokens_seen as f64 / started.elapsed().as_secs_f64().max(1e-9);
    let peak_memory = memory.finish();
    if let Some(peak) = peak_memory {
        tracing::info!("{peak} on {}", crate::device::describe(&device));
    }

    adapter::save(&model, base, out.path())?;
    log.finish()?;
    let output = out.commit().context("cannot finish the output folder")?;
    Ok(TrainSummary {
        output,
        steps: total_steps,
        first_loss,
        last_loss,
        val_loss,
        tokens_per_s,
        peak_memory,
    })
}

/// Mean loss per target token over the validation examples (no dropout).
pub fn validation_loss(
    model: &Model,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> Result<f64> {
    let (mut sum, mut count) = (0f64, 0usize);
    for chunk in examples.chunks(batch_size) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = Batch::pad(&refs, pad, model.lm.device())?;
        let (nll, n) = loss::summed_nll(&model.lm, &batch, None)?;
        sum += nll
            .detach()
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
        count += n;
    }
    Ok(sum / count.max(1) as f64)
}

/// An endless, epoch-wise reshuffled stream of micro-batches; the order depends only on the seed.
struct MicroBatches<'a> {
    examples: &'a [Example],
    batch_size: usize,
    seed: u64,
    epoch: u64,
    order: Vec<usize>,
    pos: usize,
}

impl<'a> MicroBatches<'a> {
    fn new(examples: &'a [Example], batch_size: usize, seed: u64) -> Self {
        let mut s = Self {
            examples,
            batch_size,
            seed,
            epoch: 0,
            order: Vec::new(),
            pos: 0,
        };
        s.reshuffle();
        s
    }

    fn reshuffle(&mut self) {
        self.order = (0..self.examples.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(self.epoch));
        self.order.shuffle(&mut rng);
        self.pos = 0;
    }

    fn next(&mut self) -> Vec<&'a Example> {
        if self.pos >= self.order.len() {
            self.epoch += 1;
            self.reshuffle();
        }
        let end = (self.pos + self.batch_size).min(self.order.len());
        let batch = self.order[self.pos..end]
            .iter()
            .map(|&i| &self.examples[i])
            .collect();
        self.pos = end;
        batch
    }
}

fn progress_bar(total: u64) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
    ) {
        bar.set_style(style);
    }
    bar
}
