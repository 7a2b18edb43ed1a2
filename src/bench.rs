//! `feinschliff bench`: tokens/s, step time and peak memory on a random model of a named shape —
//! `train`: the real LoRA train step (r16, alpha 32, all seven projections, batch 4 × 256);
//! `score`: forward scoring without gradients as the eval harness runs it (batch 8 × 256);
//! `generate`: greedy decoding with the KV cache (batch 1, a 32-token prompt, 128 new tokens).

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use crate::data::Batch;
use crate::device::{gb, peak_rss_bytes, MemoryPeak, PeakMemory};
use crate::model::kernels::phases::{self, Phase};
use crate::model::kernels::quant::Quantization;
use crate::model::new::{config_json, weight_specs, Init, Size};
use crate::model::weights::{TensorReader, Weights};
use crate::model::{adapter, CausalLm, LoraConfig, ModelConfig, TargetModules, TokenLayout};
use crate::train::optim::{AdamW, AdamWParams};
use crate::train::step::optimizer_step;

/// The measured figures.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub what: &'static str,
    pub arch: String,
    pub size: Size,
    pub dtype: DType,
    pub quantize: Option<Quantization>,
    pub batch: usize,
    pub seq: usize,
    pub steps: usize,
    pub step_seconds: f64,
    pub tokens_per_s: f64,
    /// Peak memory from model load to the last step.
    pub peak: Option<MemoryPeak>,
    /// The device, as the run log names it.
    pub device: String,
    /// Per phase: seconds and floating-point operations over the timed steps.
    pub phases: Vec<(Phase, f64, f64)>,
    /// The share of positions with a label (train).
    pub trained_fraction: f64,
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let peak = self
            .peak
            .map(|p| p.to_string())
            .unwrap_or_else(|| "peak memory n/a".into());
        let labelled = if self.trained_fraction < 1.0 {
            format!(
                " (labels on {:.0} % of positions)",
                100.0 * self.trained_fraction
            )
        } else {
            String::new()
        };
        let quantized = self
            .quantize
            .map(|q| format!(" projections {q}"))
            .unwrap_or_default();
        write!(
            f,
            "bench {} {} {:?} {:?}{quantized} on {}: batch {} x {}{labelled}, {} steps, {:.3} s/step, {:.0} tokens/s, {peak}",
            self.what,
            self.arch,
            self.size,
            self.dtype,
            self.device,
            self.batch,
            self.seq,
            self.steps,
            self.step_seconds,
            self.tokens_per_s
        )?;
        let steps = self.steps.max(1) as f64;
        let mut counted = 0.0;
        for &(phase, seconds, flops) in &self.phases {
            if seconds == 0.0 {
                continue;
            }
            counted += seconds;
            let rate = if flops > 0.0 {
                format!(", {:.0} GFLOP/s", flops / seconds * 1e-9)
            } else {
                String::new()
            };
            write!(
                f,
                "\n  {:<12} {:>7.3} s/step {:>5.1} %{rate}",
                format!("{phase:?}"),
                seconds / steps,
                100.0 * seconds / steps / self.step_seconds
            )?;
        }
        if !self.phases.is_empty() {
            let rest = (self.step_seconds - counted / steps).max(0.0);
            write!(
                f,
                "\n  {:<12} {:>7.3} s/step {:>5.1} % (candle's own ops: residual adds, copies, embeddings, gradient sums)",
                "Other",
                rest,
                100.0 * rest / self.step_seconds
            )?;
        }
        Ok(())
    }
}

/// What to measure: the shape, batch and compute dtype.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub arch: String,
    pub size: Size,
    pub batch: usize,
    pub seq: usize,
    pub dtype: DType,
    /// Hold the projection weights quantized (`[model] quantize`).
    pub quantize: Option<Quantization>,
    pub steps: usize,
    pub gradient_checkpointing: bool,
    /// Train and score: the share of each row's positions that carry a label (1.0: every position).
    pub trained_fraction: f64,
}

/// A random `arch` model of the spec's size on `device`, its frozen weights in the spec's dtype,
/// drawn on the device itself (a 1B model's weights take a minute to draw on one CPU core, a
/// moment on a GPU). With `quantize`, the projections are held quantized, each drawn on the device
/// and quantized (on the CPU) before the next is drawn, so that no dense copy of the model ever
/// exists.
fn random_model(spec: &BenchSpec, device: &Device) -> Result<CausalLm> {
    let shape = spec.size.shape();
    let tie = spec.size.tied();
    let config = ModelConfig::from_json(&config_json(&spec.arch, &shape, tie)?)?;
    let specs = weight_specs(&spec.arch, &shape, tie)?;
    let dtype = spec.dtype;
    if let Some(format) = spec.quantize {
        let reader = RandomTensors {
            specs: specs.into_iter().map(|(n, d, i)| (n, (d, i))).collect(),
            std: shape.init_std,
            device: device.clone(),
        };
        let weights = Weights::from_reader(Path::new("<random>"), Box::new(reader), dtype, device);
        return CausalLm::load_quantized(config, &weights, device, Some(format));
    }
    let tensors = specs
        .into_iter()
        .map(|(name, dims, init)| {
            Ok((
                name,
                draw(&dims, init, shape.init_std, device)?.to_dtype(dtype)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    CausalLm::load(
        config,
        &Weights::from_tensors(tensors, dtype, device),
        device,
    )
}

/// A random tensor as `init` says, f32 on `device`.
fn draw(dims: &[usize], init: Init, std: f32, device: &Device) -> Result<Tensor> {
    Ok(match init {
        Init::Normal => Tensor::randn(0f32, std, dims, device)?,
        Init::Zeros => Tensor::zeros(dims, DType::F32, device)?,
        Init::Ones => Tensor::ones(dims, DType::F32, device)?,
    })
}

/// The tensors of a random model, each drawn on `device` when it is read.
struct RandomTensors {
    specs: HashMap<String, (Vec<usize>, Init)>,
    std: f32,
    device: Device,
}

impl TensorReader for RandomTensors {
    fn names(&self) -> Vec<String> {
        self.specs.keys().cloned().collect()
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        self.specs.get(name).map(|(dims, _)| dims.clone())
    }

    fn read(&self, name: &str) -> Result<Tensor> {
        let (dims, init) = self
            .specs
            .get(name)
            .with_context(|| format!("no tensor `{name}`"))?;
        draw(dims, *init, self.std, &self.device)
    }
}

/// A batch of random tokens whose last `trained` share of each row are targets (the rest is
/// context without a label, as the prompt of chat data trained on its answers).
fn random_batch(
    batch: usize,
    seq: usize,
    vocab: usize,
    trained: f64,
    device: &Device,
) -> Result<Batch> {
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let ids: Vec<u32> = (0..batch * seq)
        .map(|_| rng.random_range(0..vocab as u32))
        .collect();
    let first_target = (seq - ((seq as f64 * trained).round() as usize).min(seq)).max(1);
    let labels = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if i % seq >= first_target {
                id as i64
            } else {
                crate::data::IGNORE_INDEX
            }
        })
        .collect();
    Ok(Batch {
        input_ids: Tensor::from_vec(ids, (batch, seq), device)?,
        labels,
        layout: TokenLayout::causal(batch, seq),
        target_tokens: batch * (seq - first_target),
        tokens: batch * seq,
    })
}

/// Times `steps` forward scoring passes (after one warm-up pass), no gradients.
pub fn score(spec: &BenchSpec, device: &Device) -> Result<BenchReport> {
    let memory = PeakMemory::watch(device);
    let lm = random_model(spec, device)?;
    let vocab = spec.size.shape().vocab;
    let b = random_batch(spec.batch, spec.seq, vocab, spec.trained_fraction, device)?;
    crate::train::loss::summed_nll(&lm, &b, None)?;
    phases::enable();
    let started = Instant::now();
    for _ in 0..spec.steps {
        crate::train::loss::summed_nll(&lm, &b, None)?;
    }
    device.synchronize()?;
    Ok(report("score", spec, started, memory, device))
}

/// Times greedy generation of `new_tokens` tokens after prompts of `spec.seq` random tokens
/// (after one short warm-up); tokens/s counts generated tokens of all rows.
pub fn generate(spec: &BenchSpec, new_tokens: usize, device: &Device) -> Result<BenchReport> {
    let memory = PeakMemory::watch(device);
    let lm = random_model(spec, device)?;
    let vocab = spec.size.shape().vocab as u32;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let prompts: Vec<Vec<u32>> = (0..spec.batch)
        .map(|_| (0..spec.seq).map(|_| rng.random_range(0..vocab)).collect())
        .collect();
    crate::model::generate::greedy(&lm, &mut prompts.clone(), 2, 0, |_, _| Ok(false))?;
    phases::enable();
    let started = Instant::now();
    crate::model::generate::greedy(&lm, &mut prompts.clone(), new_tokens, 0, |_, _| Ok(false))?;
    device.synchronize()?;
    let elapsed = started.elapsed().as_secs_f64();
    let mut out = report("generate", spec, started, memory, device);
    out.trained_fraction = 1.0;
    out.steps = new_tokens;
    out.step_seconds = elapsed / new_tokens.max(1) as f64;
    out.tokens_per_s = (spec.batch * new_tokens) as f64 / elapsed;
    Ok(out)
}

fn report(
    what: &'static str,
    spec: &BenchSpec,
    started: Instant,
    memory: PeakMemory,
    device: &Device,
) -> BenchReport {
    let elapsed = started.elapsed().as_secs_f64();
    BenchReport {
        what,
        arch: spec.arch.clone(),
        size: spec.size,
        dtype: spec.dtype,
        quantize: spec.quantize,
        batch: spec.batch,
        seq: spec.seq,
        steps: spec.steps,
        step_seconds: elapsed / spec.steps as f64,
        tokens_per_s: (spec.batch * spec.seq * spec.steps) as f64 / elapsed,
        peak: memory.finish(),
        device: crate::device::describe(device),
        phases: phases::take(),
        trained_fraction: spec.trained_fraction,
    }
}

/// Times `steps` LoRA train steps (after one warm-up step) on a random `arch` model of `size`.
pub fn train(spec: &BenchSpec, device: &Device) -> Result<BenchReport> {
    let memory = PeakMemory::watch(device);
    let mut lm = random_model(spec, device)?;
    lm.gradient_checkpointing = spec.gradient_checkpointing;
    let lora_config = LoraConfig {
        r: 16,
        alpha: 32.0,
        dropout: 0.0,
        target_modules: TargetModules::Pattern("all-linear".into()),
        use_rslora: false,
    };
    adapter::attach(&mut lm, &lora_config, 0)?;
    let trainable = adapter::trainable(&lm);
    let params = AdamWParams::default();
    let mut optimizer = AdamW::new(trainable.iter().map(|(_, v)| v.clone()).collect(), params)?;
    let batches = [random_batch(
        spec.batch,
        spec.seq,
        spec.size.shape().vocab,
        spec.trained_fraction,
        device,
    )?];
    optimizer_step(
        &lm,
        &trainable,
        &mut optimizer,
        &batches,
        1e-4,
        1.0,
        0,
        false,
    )?;
    phases::enable();
    let started = Instant::now();
    for step in 0..spec.steps {
        optimizer_step(
            &lm,
            &trainable,
            &mut optimizer,
            &batches,
            1e-4,
            1.0,
            step as u64 + 1,
            false,
        )?;
    }
    device.synchronize()?;
    Ok(report("train", spec, started, memory, device))
}

/// What the data benchmark measured.
#[derive(Debug, Clone)]
pub struct DataBenchReport {
    pub rows: usize,
    pub seconds: f64,
    pub samples: usize,
    pub packed_rows: usize,
    pub packing_efficiency: f64,
    pub peak_rss_bytes: Option<u64>,
}

impl std::fmt::Display for DataBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let rss = self.peak_rss_bytes.map(gb).unwrap_or_else(|| "n/a".into());
        write!(
            f,
            "bench data: {} chat rows loaded, rendered, tokenized and packed in {:.1} s = {:.0} rows/s; {} samples in {} rows of 512 tokens ({:.1} % filled), peak RSS {rss}",
            self.rows,
            self.seconds,
            self.rows as f64 / self.seconds,
            self.samples,
            self.packed_rows,
            100.0 * self.packing_efficiency
        )
    }
}

/// Times `data::prepare` (jsonl load with Polars, chat template, tokenization, masks, packing) on a
/// synthetic set of `rows` multi-turn German support chats, with the tokenizer of `model_dir`.
pub fn data(model_dir: &std::path::Path, rows: usize) -> Result<DataBenchReport> {
    use std::io::Write;
    let dir = tempfile_dir()?;
    let topics = [
        "Abschlag",
        "Zählerstand",
        "Umzug",
        "Glasfaser",
        "Ladekarte",
        "Störung",
        "Tarifwechsel",
        "Rechnung",
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let mut file = std::io::BufWriter::new(std::fs::File::create(dir.join("chats.jsonl"))?);
    for i in 0..rows {
        let turns = 1 + i % 3;
        let mut messages = vec![
            serde_json::json!({"role": "system", "content": "Sie sind der Kundenservice der Stadtwerke Lindenau."}),
        ];
        for t in 0..turns {
            let topic = topics[rng.random_range(0..topics.len())];
            messages.push(serde_json::json!({"role": "user", "content": format!("Anfrage {i}-{t}: Ich habe eine Frage zu meinem {topic}. Was muss ich tun?")}));
            messages.push(serde_json::json!({"role": "assistant", "content": format!("Gern helfe ich Ihnen beim Thema {topic}. Im Portal „Mein Lindenau“ finden Sie unter Vertrag alle Schritte; Vorgang {}.", rng.random_range(1000..9999))}));
        }
        serde_json::to_writer(&mut file, &serde_json::json!({ "messages": messages }))?;
        file.write_all(b"\n")?;
    }
    file.flush()?;
    let recipe_text = format!(
        "[model]\nbase = \"{}\"\n[data]\nformat = \"chat\"\npacking = true\nmax_seq_len = 512\nvalidation_fraction = 0.01\n[[data.train]]\npath = \"chats.jsonl\"\n[output]\ndir = \"out\"\n",
        model_dir.canonicalize()?.display()
    );
    std::fs::write(dir.join("recipe.toml"), recipe_text)?;
    let recipe = crate::recipe::Recipe::load(&dir.join("recipe.toml"), &[])?;
    let tokenizer = crate::model::ModelTokenizer::from_dir(model_dir)?;
    let started = Instant::now();
    let prepared = crate::data::prepare(&recipe, &tokenizer)?;
    let seconds = started.elapsed().as_secs_f64();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(DataBenchReport {
        rows,
        seconds,
        samples: prepared.report.train_samples + prepared.report.validation_samples,
        packed_rows: prepared.train.len(),
        packing_efficiency: prepared.report.packing_efficiency.unwrap_or(0.0),
        peak_rss_bytes: peak_rss_bytes(),
    })
}

/// A fresh folder under the system temp dir for benchmark inputs.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("feinschliff-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
