//! `metrics.jsonl`: one JSON line per optimizer step.

use anyhow::{Context, Result};
use serde::Serialize;
use std::io::Write;
use std::path::Path;

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
            .with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self {
            file: std::io::BufWriter::new(file),
        })
    }

    pub fn write(&mut self, record: &StepRecord) -> Result<()> {
        serde_json::to_writer(&mut self.file, record)?;
        self.file.write_all(b"\n")?;
        self.file.flush()?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.file.flush()?;
        Ok(())
    }
}
