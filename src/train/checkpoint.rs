//! Training checkpoints, everything an exact resume needs: the adapter (PEFT format), the AdamW
//! moments and step counts, the step, the data cursor (the shuffle is drawn from the seed and
//! the epoch, dropout from the seed and the step) and metrics.jsonl so far, plus fingerprints of
//! the recipe, the data and the base model. Each is written to a temporary folder and renamed
//! into `<run>/checkpoints/checkpoint-<step>`; only the latest `save_total_limit` are kept.

use anyhow::{anyhow, Context, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::optim::AdamW;
use crate::data::Example;
use crate::failure::RuntimeFailure;
use crate::fsutil::write_atomic;
use crate::model::{adapter, weights::save_safetensors, BaseModel, Model};
use crate::recipe::{Recipe, TrainSection};

/// The folder of a run's checkpoints, inside its output folder.
pub const DIR: &str = "checkpoints";
const STATE_FILE: &str = "state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const METRICS_FILE: &str = "metrics.jsonl";

/// What a run computes from: its recipe settings, its tokenized data and its base model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Fingerprint {
    /// `section.key` → value, for every recipe setting that changes the computation.
    pub recipe: BTreeMap<String, String>,
    /// SHA-256 of the tokenized training and validation samples.
    pub data: String,
    /// SHA-256 of config.json and the safetensors headers and sizes of the base.
    pub base: String,
}

impl Fingerprint {
    pub fn of(
        recipe: &Recipe,
        train: &[Example],
        validation: &[Example],
        base: &BaseModel,
    ) -> Result<Self> {
        let mut settings = BTreeMap::new();
        for (section, value) in [
            ("model", toml::Value::try_from(&recipe.model)?),
            ("lora", toml::Value::try_from(&recipe.lora)?),
            ("data", toml::Value::try_from(&recipe.data)?),
            ("train", toml::Value::try_from(&recipe.train)?),
        ] {
            flatten(section, &value, &mut settings);
        }
        for key in TrainSection::NOT_AFFECTING_RESULTS {
            settings.remove(&format!("train.{key}"));
        }
        let mut data = Sha256::new();
        for (split, examples) in [("train", train), ("validation", validation)] {
            data.update(split.as_bytes());
            for e in examples {
                data.update((e.input_ids.len() as u64).to_le_bytes());
                e.input_ids
                    .iter()
                    .for_each(|t| data.update(t.to_le_bytes()));
                e.labels.iter().for_each(|t| data.update(t.to_le_bytes()));
                e.segments
                    .iter()
                    .for_each(|s| data.update((*s as u64).to_le_bytes()));
            }
        }
        Ok(Self {
            recipe: settings,
            data: hex(&data.finalize()),
            base: base_fingerprint(&base.dir)?,
        })
    }

    /// What changed since `saved` in a way that breaks an exact resume (empty: nothing).
    pub fn differences(&self, saved: &Fingerprint) -> Vec<String> {
        let mut out = Vec::new();
        let keys: std::collections::BTreeSet<&String> =
            self.recipe.keys().chain(saved.recipe.keys()).collect();
        for key in keys {
            let (now, then) = (self.recipe.get(key), saved.recipe.get(key));
            if now != then {
                let show = |v: Option<&String>| v.map_or("(unset)".to_string(), Clone::clone);
                out.push(format!(
                    "recipe `{key}` was {} and is now {}",
                    show(then),
                    show(now)
                ));
            }
        }
        if self.data != saved.data {
            out.push("the training or validation data (as tokenized) changed".into());
        }
        if self.base != saved.base {
            out.push("the base model's files (config.json or weights) changed".into());
        }
        out
    }
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut BTreeMap<String, String>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// config.json and, per safetensors file, its name, size and header (which holds every tensor's
/// name, dtype, shape and offsets); the tensor bytes themselves are not read. A GGUF base: its
/// size and first MiB (header, metadata and tensor index of a small model; most of them of a big one).
fn base_fingerprint(dir: &Path) -> Result<String> {
    use std::io::Read;
    let mut hash = Sha256::new();
    if dir.is_file() {
        let file =
            std::fs::File::open(dir).with_context(|| format!("cannot open {}", dir.display()))?;
        hash.update(file.metadata()?.len().to_le_bytes());
        let mut head = Vec::new();
        file.take(1 << 20).read_to_end(&mut head)?;
        hash.update(&head);
        return Ok(hex(&hash.finalize()));
    }
    let config = dir.join("config.json");
    hash.update(
        std::fs::read(&config).with_context(|| format!("cannot read {}", config.display()))?,
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("cannot list {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    for path in files {
        let mut file = std::fs::File::open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let size = file.metadata()?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .with_context(|| format!("{} is too short for a safetensors file", path.display()))?;
        let header_len = u64::from_le_bytes(len).min(size.saturating_sub(8));
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header)?;
        hash.update(
            path.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        hash.update(size.to_le_bytes());
        hash.update(&header);
    }
    Ok(hex(&hash.finalize()))
}

/// Where the loop stood after `step` steps.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: usize,
    /// The data cursor: epoch of the shuffle and position in it.
    pub data_epoch: u64,
    pub data_pos: usize,
    pub tokens_seen: usize,
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub val_loss: Option<f64>,
    /// Updates skipped for a loss or gradient that was not finite.
    pub skipped_updates: usize,
    /// Seconds of training before this checkpoint (for tokens/s after a resume).
    pub elapsed_s: f64,
    /// The step and validation loss of the best evaluation so far (its checkpoint is kept).
    #[serde(default)]
    pub best: Option<(usize, f64)>,
    /// Evaluations since the best one, for early stopping.
    #[serde(default)]
    pub evals_since_best: usize,
    pub fingerprint: Fingerprint,
}

/// A complete checkpoint on disk.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    /// AdamW's update count per trainable tensor.
    adam_steps: Vec<i32>,
}

/// state.json: the loop's state and AdamW's step counts.
#[derive(Serialize, Deserialize)]
struct StateFile {
    #[serde(flatten)]
    state: TrainState,
    adam_steps: Vec<i32>,
}

/// Writes a checkpoint of the run in `run_dir` and keeps only the latest `keep` (and that of the
/// best validation loss); returns its folder.
pub fn save(
    run_dir: &Path,
    keep: usize,
    model: &Model,
    base: &BaseModel,
    optimizer: &AdamW,
    state: &TrainState,
) -> Result<PathBuf> {
    let root = run_dir.join(DIR);
    let name = format!("checkpoint-{}", state.step);
    let target = root.join(&name);
    if target.join(STATE_FILE).exists() {
        return Ok(target);
    }
    let tmp = root.join(format!(".{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).runtime()?;
    }
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))
        .runtime()?;
    let written = (|| -> Result<()> {
        model.save_adapter(base, &tmp)?;
        let (m, v, _) = optimizer.state();
        let mut tensors: Vec<(String, Tensor)> = Vec::with_capacity(2 * m.len());
        for (i, (m, v)) in m.iter().zip(v).enumerate() {
            tensors.push((format!("m.{i}"), m.clone()));
            tensors.push((format!("v.{i}"), v.clone()));
        }
        save_safetensors(&tensors, &tmp.join(OPTIMIZER_FILE))?;
        let metrics = std::fs::read(run_dir.join(METRICS_FILE)).runtime()?;
        write_atomic(&tmp.join(METRICS_FILE), &metrics)?;
        let saved = StateFile {
            state: state.clone(),
            adam_steps: optimizer.state().2.to_vec(),
        };
        write_atomic(
            &tmp.join(STATE_FILE),
            serde_json::to_string_pretty(&saved)?.as_bytes(),
        )?;
        std::fs::rename(&tmp, &target)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), target.display()))
            .runtime()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!("cannot write checkpoint {}", target.display())));
    }
    let best = state.best.map(|(step, _)| step);
    let outdated = complete(run_dir)?.into_iter().rev().skip(keep);
    for (_, old) in outdated.filter(|(step, _)| Some(*step) != best) {
        // The state file goes first: a removal cut short leaves an incomplete folder, never one
        // that looks complete with files missing.
        std::fs::remove_file(old.join(STATE_FILE))
            .and_then(|()| std::fs::remove_dir_all(&old))
            .with_context(|| format!("cannot remove old checkpoint {}", old.display()))
            .runtime()?;
    }
    Ok(target)
}

/// The complete checkpoints of a run (those with a state file), oldest first.
fn complete(run_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let root = run_dir.join(DIR);
    if !root.exists() {
        return Ok(Vec::new());
    }
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(&root)
        .with_context(|| format!("cannot list {}", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let step = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            p.join(STATE_FILE).exists().then_some((step, p))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// Whether the run in `run_dir` has a complete checkpoint.
pub fn exists(run_dir: &Path) -> bool {
    complete(run_dir).is_ok_and(|c| !c.is_empty())
}

/// The latest complete checkpoint of the run in `run_dir`.
pub fn latest(run_dir: &Path) -> Result<Option<Checkpoint>> {
    match complete(run_dir)?.pop() {
        Some((_, dir)) => read(dir).map(Some),
        None => Ok(None),
    }
}

/// The complete checkpoint after `step` steps.
pub fn at_step(run_dir: &Path, step: usize) -> Result<Checkpoint> {
    match complete(run_dir)?.into_iter().find(|(s, _)| *s == step) {
        Some((_, dir)) => read(dir),
        None => anyhow::bail!(
            "the checkpoint after step {step} is missing from {}",
            run_dir.join(DIR).display()
        ),
    }
}

fn read(dir: PathBuf) -> Result<Checkpoint> {
    let path = dir.join(STATE_FILE);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let saved: StateFile = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a checkpoint state", path.display()))?;
    Ok(Checkpoint {
        dir,
        state: saved.state,
        adam_steps: saved.adam_steps,
    })
}

impl Checkpoint {
    /// Puts the adapter weights into `model`'s trainable tensors and returns the AdamW state
    /// (moments and step counts, in the order of the trainable tensors).
    pub fn restore(&self, model: &Model) -> Result<(Vec<Tensor>, Vec<Tensor>, Vec<i32>)> {
        let device = model.lm.device();
        let weights = self.dir.join(adapter::WEIGHTS_FILE);
        let tensors = candle_core::safetensors::load(&weights, device)
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let trainable = model.trainable();
        for (name, var) in &trainable {
            let t = tensors
                .get(name)
                .ok_or_else(|| anyhow!("{} has no tensor `{name}`", weights.display()))?;
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let path = self.dir.join(OPTIMIZER_FILE);
        let moments = candle_core::safetensors::load(&path, device)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let get = |key: String| {
            moments
                .get(&key)
                .cloned()
                .ok_or_else(|| anyhow!("{} has no tensor `{key}`", path.display()))
        };
        let m = (0..trainable.len())
            .map(|i| get(format!("m.{i}")))
            .collect::<Result<_>>()?;
        let v = (0..trainable.len())
            .map(|i| get(format!("v.{i}")))
            .collect::<Result<_>>()?;
        Ok((m, v, self.adam_steps.clone()))
    }

    /// metrics.jsonl as it was at this checkpoint.
    pub fn metrics(&self) -> PathBuf {
        self.dir.join(METRICS_FILE)
    }
}
