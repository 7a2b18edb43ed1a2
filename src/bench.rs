//! `feinschliff bench`: tokens/s, step time and peak memory on a random model of a named shape —
//! `train`: the real LoRA train step (r16, alpha 32, all seven projections, batch 4 × 256);
//! `score`: forward scoring without gradients as the eval harness runs it (batch 8 × 256).

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

use crate::data::Batch;
use crate::model::new::{config_json, random_weights, Size};
use crate::model::weights::Weights;
use crate::model::{lora, CausalLm, LoraConfig, ModelConfig, TargetModules, TokenLayout};
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::step::optimizer_step;

/// The measured figures.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub what: &'static str,
    pub arch: String,
    pub size: Size,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub step_seconds: f64,
    pub tokens_per_s: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rss = self
            .peak_rss_bytes
            .map(|b| format!("{:.2} GB", b as f64 / 1e9))
            .unwrap_or_else(|| "n/a".into());
        write!(
            f,
            "bench {} {} {:?}: batch {} x {}, {} steps, {:.3} s/step, {:.0} tokens/s, peak RSS {rss}",
            self.what,
            self.arch, self.size, self.batch, self.seq, self.steps, self.step_seconds, self.tokens_per_s
        )
    }
}

/// A random `arch` model of `size` on `device`.
fn random_model(arch: &str, size: Size, device: &Device) -> Result<CausalLm> {
    let shape = size.shape();
    let tie = size == Size::Smol;
    let config = ModelConfig::from_json(&config_json(arch, &shape, tie)?)?;
    let weights = Weights::from_tensors(random_weights(arch, &shape, tie, 0)?, DType::F32, device);
    CausalLm::load(config, &weights, device)
}

/// A batch of random tokens, all of them targets.
fn random_batch(batch: usize, seq: usize, vocab: usize, device: &Device) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let labels = ids.iter().map(|&i| i as i64).collect();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (batch, seq), device)?,
        labels,
        layout: TokenLayout::causal(batch, seq),
        target_tokens: batch * (seq - 1),
        tokens: batch * seq,
    })
}

/// Times `steps` forward scoring passes (after one warm-up pass), no gradients.
pub fn score(arch: &str, size: Size, steps: usize, device: &Device) -> Result<BenchReport> {
    let lm = random_model(arch, size, device)?;
    let (batch, seq) = (8, 256);
    let b = random_batch(batch, seq, size.shape().vocab, device)?;
    crate::train::loss::summed_nll(&lm, &b, None)?;
    let started = Instant::now();
    for _ in 0..steps {
        crate::train::loss::summed_nll(&lm, &b, None)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(BenchReport {
        what: "score",
        arch: arch.to_string(),
        size,
        batch,
        seq,
        steps,
        step_seconds: elapsed / steps as f64,
        tokens_per_s: (batch * seq * steps) as f64 / elapsed,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// Times `steps` LoRA train steps (after one warm-up step) on a random `arch` model of `size`.
pub fn train(arch: &str, size: Size, steps: usize, device: &Device) -> Result<BenchReport> {
    let mut lm = random_model(arch, size, device)?;
    let lora_config = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(
            lora::LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        ),
        use_rslora: false,
    };
    lora::attach(&mut lm, &lora_config, 0)?;
    let trainable = lora::trainable(&lm);
    let params = AdamWParams {
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut optimizer = AdamW::new(trainable.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let (batch, seq) = (4, 256);
    let batches = [random_batch(batch, seq, size.shape().vocab, device)?];
    optimizer_step(&lm, &trainable, &mut optimizer, &batches, 1e-4, 1.0, 0)?;
    let started = Instant::now();
    for step in 0..steps {
        optimizer_step(
            &lm,
            &trainable,
            &mut optimizer,
            &batches,
            1e-4,
            1.0,
            step as u64 + 1,
        )?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(BenchReport {
        what: "train",
        arch: arch.to_string(),
        size,
        batch,
        seq,
        steps,
        step_seconds: elapsed / steps as f64,
        tokens_per_s: (batch * seq * steps) as f64 / elapsed,
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// The process's peak resident set size (VmHWM), where /proc tells it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
