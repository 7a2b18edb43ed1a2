//! The train stage: LoRA fine-tuning of a base model as a recipe describes it. Reads top to bottom:
//! load → attach adapters → prepare data → (resume from a checkpoint) → loop (accumulate, clip,
//! step, log, validate, checkpoint, stop on a signal) → save.

pub mod checkpoint;
pub mod interrupt;
pub mod loss;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod step;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::Device;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::PathBuf;
use std::time::Instant;

use crate::data::{self, Batch, Example};
use crate::failure::{Failure, RuntimeFailure};
use crate::fsutil::{write_atomic, StagedDir};
use crate::model::{adapter, BaseModel, Model};
use crate::recipe::Recipe;
use checkpoint::{Fingerprint, TrainState};
use metrics::{MetricsLog, Progress, StepRecord};

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
    /// What the data stage read and made of it, as `data inspect` reports it.
    pub data_summary: String,
}

/// How a run treats what is already there.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunOptions {
    /// Replace an existing output folder, or start over where an interrupted run left checkpoints.
    pub force: bool,
    /// Continue the interrupted run of this recipe from its latest checkpoint.
    pub resume: bool,
}

/// The frozen base as the recipe trains it, and as its eval scores it: in `[model] dtype`, its
/// projections quantized as `[model] quantize` says.
pub fn load_base(recipe: &Recipe, base: &BaseModel, device: &Device) -> Result<Model> {
    Model::load_quantized(
        &base.dir,
        Some(recipe.model.dtype.dtype()),
        recipe.model.quantize,
        device,
    )
}

/// Runs the recipe's training on `base` (see [`Recipe::locate_base`]) and writes the adapter, the
/// resolved recipe and metrics.jsonl. The output is staged in `.<name>.partial` beside it, with
/// the run's checkpoints, and appears under its name when training is done.
pub fn run(recipe: &Recipe, base: &BaseModel, options: RunOptions) -> Result<TrainSummary> {
    let t = &recipe.train;
    let device = crate::device::open(&t.device)?;
    let memory = crate::device::PeakMemory::watch(&device);
    let out = StagedDir::reusable(
        &recipe.resolve(&recipe.output.dir),
        options.force,
        checkpoint::exists,
    )?;
    let previous = checkpoint::latest(out.path())?;
    match (&previous, options.resume) {
        (None, true) => bail!(
            "nothing to resume: {} holds no checkpoint of an interrupted run; start without --resume",
            out.path().display()
        ),
        (Some(c), false) if !options.force => bail!(
            "an interrupted run of this recipe left a checkpoint after step {} in {}; pass --resume to continue it, or --force to start over",
            c.state.step,
            c.dir.display()
        ),
        (_, false) => out.clear()?,
        (Some(_), true) => {}
    }

    let mut model = load_base(recipe, base, &device)?;
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
    let quantized = crate::model::kernels::projection_weight::summary(
        model.lm.linears().into_iter().map(|(_, l)| &l.weight),
    )
    .map(|s| format!(" ({s})"))
    .unwrap_or_default();
    tracing::info!(
        "model {} ({}, {} parameters) on {}; frozen base in {:?}{quantized}, LoRA weights, gradients, AdamW state, norms, softmax and loss in f32; LoRA r {} on {} ({} trainable parameters)",
        base.dir.display(),
        model.lm.config.model_type,
        crate::model::layout::parameter_count(&model.lm.config),
        crate::device::describe(&device),
        recipe.model.dtype,
        model.lora.as_ref().map(|l| l.r).unwrap_or(recipe.lora.r),
        adapter::adapted_module_names(&model.lm).join(","),
        model.trainable_parameter_count()
    );

    model.lm.gradient_checkpointing = t.gradient_checkpointing.unwrap_or(false);
    if model.lm.gradient_checkpointing {
        tracing::info!("gradient checkpointing: each layer is recomputed in the backward pass");
    }
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
    let mut state = TrainState {
        step: 0,
        data_epoch: 0,
        data_pos: 0,
        tokens_seen: 0,
        first_loss: None,
        last_loss: None,
        val_loss: None,
        skipped_updates: 0,
        elapsed_s: 0.0,
        best: None,
        evals_since_best: 0,
        fingerprint: Fingerprint::of(recipe, &data.train, &data.validation, base)?,
    };
    let metrics_path = out.path().join("metrics.jsonl");
    let mut log = match previous.filter(|_| options.resume) {
        Some(c) => {
            let changed = state.fingerprint.differences(&c.state.fingerprint);
            if !changed.is_empty() {
                bail!(
                    "cannot continue the run in {} exactly: since its checkpoint after step {}, {}. Undo the change, or pass --force to start over",
                    out.path().display(),
                    c.state.step,
                    changed.join("; ")
                );
            }
            let (m, v, counts) = c.restore(&model)?;
            optimization.resume(c.state.step, m, v, counts)?;
            micro_batches.seek(c.state.data_epoch, c.state.data_pos);
            std::fs::copy(c.metrics(), &metrics_path)
                .with_context(|| format!("cannot restore {}", metrics_path.display()))
                .runtime()?;
            tracing::info!(
                "resuming after step {}/{total_steps} from {}",
                c.state.step,
                c.dir.display()
            );
            state = c.state;
            MetricsLog::append(&metrics_path)?
        }
        None => MetricsLog::create(&metrics_path)?,
    };

    let pad = model.tokenizer.pad_id();
    // The best adapter is kept on disk when the run may go back to it.
    let keeps_best = t.load_best_at_end || t.early_stopping_patience.is_some();
    let interrupts = interrupt::Interrupts::watch()?;
    let progress = Progress::new(total_steps, state.step, t.logging_steps);
    let started = Instant::now();
    let elapsed_before = state.elapsed_s;
    for step in state.step..total_steps {
        let group: Vec<Vec<&Example>> = (0..t.gradient_accumulation)
            .map(|_| micro_batches.next())
            .collect();
        let batches = group
            .iter()
            .map(|g| Batch::pad(g, pad, &device))
            .collect::<Result<Vec<_>>>()?;
        let outcome = optimization
            .step(&model.lm, &batches)
            .runtime()
            .map_err(|e| match checkpoint::latest(out.path()).ok().flatten() {
                Some(c) => e.context(format!(
                    "training stopped; the last good checkpoint (after step {}) is {}, continue with --resume",
                    c.state.step,
                    c.dir.display()
                )),
                None => e,
            })?;
        if let Some(what) = &outcome.skipped {
            state.skipped_updates += 1;
            tracing::warn!(
                "step {}: {what}; the update was skipped ({} so far)",
                step + 1,
                state.skipped_updates
            );
        }
        state.tokens_seen += outcome.tokens;
        state.first_loss.get_or_insert(outcome.loss);
        state.last_loss = Some(outcome.loss);
        let is_last = step + 1 == total_steps;
        let eval_now = !data.validation.is_empty()
            && (is_last || (t.eval_every > 0 && (step + 1) % t.eval_every == 0));
        let step_val = if eval_now {
            let v = validation_loss(&model, &data.validation, t.batch_size, pad)?;
            state.val_loss = Some(v);
            if state.best.is_none_or(|(_, best)| v < best) {
                state.best = Some((step + 1, v));
                state.evals_since_best = 0;
            } else {
                state.evals_since_best += 1;
            }
            Some(v)
        } else {
            None
        };
        let stop_early = t
            .early_stopping_patience
            .is_some_and(|patience| state.evals_since_best >= patience);
        state.elapsed_s = elapsed_before + started.elapsed().as_secs_f64();
        let record = StepRecord {
            step: step + 1,
            epoch: (step + 1) as f64 / steps_per_epoch as f64,
            loss: outcome.loss,
            lr: outcome.lr,
            grad_norm: outcome.grad_norm,
            tokens: state.tokens_seen,
            tokens_per_s: state.tokens_seen as f64 / state.elapsed_s.max(1e-9),
            val_loss: step_val,
            skipped_updates: state.skipped_updates,
        };
        log.write(&record)?;
        progress.update(&record);
        state.step = step + 1;
        (state.data_epoch, state.data_pos) = micro_batches.cursor();
        let interrupted = interrupts.received();
        let new_best = eval_now && state.evals_since_best == 0 && keeps_best;
        let due = (t.save_every > 0 && state.step.is_multiple_of(t.save_every))
            || state.step.is_multiple_of(steps_per_epoch)
            || interrupted.is_some()
            || new_best;
        if due && !is_last && !stop_early {
            let dir = checkpoint::save(
                out.path(),
                t.save_total_limit,
                &model,
                base,
                optimization.optimizer(),
                &state,
            )?;
            plot::write(out.path())?;
            if let Some(signal) = interrupted {
                progress.finish();
                return Err(anyhow!(
                    "stopped after step {}/{total_steps}, checkpoint in {}; continue with: feinschliff train {} --resume",
                    state.step,
                    dir.display(),
                    recipe.source.display()
                )
                .context(Failure::Interrupted(signal)));
            }
        }
        if stop_early {
            if let Some((best_step, best_loss)) = state.best {
                tracing::info!(
                    "early stopping after step {}: the validation loss has not improved for {} evaluations (best {best_loss:.4} after step {best_step})",
                    state.step,
                    state.evals_since_best
                );
            }
            break;
        }
    }
    progress.finish();
    drop(interrupts);
    if let Some((best_step, best_loss)) = state.best.filter(|_| t.load_best_at_end) {
        if best_step != state.step {
            checkpoint::at_step(out.path(), best_step)?.restore(&model)?;
            tracing::info!(
                "the adapter is the one of step {best_step} (validation loss {best_loss:.4})"
            );
        }
    }
    let tokens_per_s = state.tokens_seen as f64 / state.elapsed_s.max(1e-9);
    let peak_memory = memory.finish();
    if let Some(peak) = peak_memory {
        tracing::info!("{peak} on {}", crate::device::describe(&device));
    }

    model.save_adapter(base, out.path())?;
    log.finish()?;
    plot::write(out.path())?;
    let checkpoints = out.path().join(checkpoint::DIR);
    if checkpoints.exists() {
        std::fs::remove_dir_all(&checkpoints)
            .with_context(|| format!("cannot remove {}", checkpoints.display()))
            .runtime()?;
    }
    let output = out.commit().context("cannot finish the output folder")?;
    Ok(TrainSummary {
        output,
        steps: state.step,
        first_loss: state.first_loss.unwrap_or(f64::NAN),
        last_loss: state.last_loss.unwrap_or(f64::NAN),
        val_loss: state.val_loss,
        tokens_per_s,
        peak_memory,
        data_summary: data::inspect::report_text(&data.report, recipe.data.max_seq_len),
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

    /// Where the stream stands: the epoch of the shuffle and the position in it.
    fn cursor(&self) -> (u64, usize) {
        (self.epoch, self.pos)
    }

    /// Continues the stream where [`Self::cursor`] said it stood.
    fn seek(&mut self, epoch: u64, pos: usize) {
        self.epoch = epoch;
        self.reshuffle();
        self.pos = pos;
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
