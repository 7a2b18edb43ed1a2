//! `metrics.jsonl`: one JSON line per optimizer step; and the progress shown while training (a
//! bar on a terminal, a log line every `logging_steps` steps otherwise).

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::{IsTerminal, Write};
use std::path::Path;

use crate::failure::RuntimeFailure;

/// What is recorded after each optimizer step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub step: usize,
    pub epoch: f64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
    pub tokens_per_s: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Updates skipped so far because the loss or gradients were not finite.
    #[serde(skip_serializing_if = "is_zero")]
    pub skipped_updates: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl StepRecord {
    /// The progress bar's message.
    pub fn progress_message(&self) -> String {
        let val = self
            .val_loss
            .map(|v| format!(" val {v:.4}"))
            .unwrap_or_default();
        format!(
            "loss {:.4}{val} lr {:.2e} {:.0} tok/s",
            self.loss, self.lr, self.tokens_per_s
        )
    }
}

/// An append-only metrics file, flushed after every line.
pub struct MetricsLog {
    file: std::io::BufWriter<std::fs::File>,
}

impl MetricsLog {
    pub fn create(path: &Path) -> Result<Self> {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))
            .runtime()?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
        })
    }

    /// Continues a metrics file (after a resume).
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))
            .runtime()?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        serde_json::to_writer(&mut self.file, record)?;
        self.file
            .write_all(b"\n")
            .and_then(|()| self.file.flush())
            .context("cannot write metrics.jsonl")
            .runtime()
    }

    pub fn finish(mut self) -> Result<()> {
        self.file
            .flush()
            .context("cannot write metrics.jsonl")
            .runtime()
    }
}

/// The progress of the steps: a bar on a terminal, else a log line every `every` steps.
pub enum Progress {
    Bar(ProgressBar),
    Lines { every: usize, total: usize },
}

impl Progress {
    /// Progress over `total` steps, of which `done` are done (a resumed run).
    pub fn new(total: usize, done: usize, every: usize) -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress::Lines { every, total };
        }
        let bar = ProgressBar::new(total as u64);
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
        ) {
            bar.set_style(style);
        }
        bar.set_position(done as u64);
        Progress::Bar(bar)
    }

    pub fn update(&self, record: &StepRecord) {
        match self {
            Progress::Bar(bar) => {
                bar.set_message(record.progress_message());
                bar.inc(1);
            }
            Progress::Lines { every, total } => {
                if record.step.is_multiple_of(*every) || record.step == *total {
                    tracing::info!(
                        "step {}/{total}: {}",
                        record.step,
                        record.progress_message()
                    );
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish();
        }
    }
}
