//! Merging an adapter into its base: W' = W + s·B·A for every adapted projection, written as a
//! full checkpoint (sharded safetensors with an index, config, tokenizer and generation files)
//! that transformers loads as is.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fsutil::{write_atomic, StagedDir};
use crate::model::weights::{save_safetensors, Weights};
use crate::model::{adapter, CausalLm, ModelConfig};

/// What to merge and how to write it.
pub struct MergeOptions {
    pub adapter: PathBuf,
    /// The base model; default: the adapter's base_model_name_or_path.
    pub base: Option<String>,
    pub out: PathBuf,
    pub dtype: Option<DType>,
    /// Largest shard in bytes.
    pub max_shard_bytes: u64,
    /// Accept a base whose name differs from the adapter's base_model_name_or_path.
    pub any_base: bool,
    /// Where the merge is computed: `auto`, `cpu` or `cuda:N`.
    pub device: String,
    pub force: bool,
}

/// Files copied from the base model as they are.
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Writes base + adapter as one full model.
pub fn merge(opts: &MergeOptions) -> Result<PathBuf> {
    let device = crate::device::open(&opts.device)?;
    let loaded = adapter::load(&opts.adapter, &device)?;
    let base_name =
        choose_base(opts, loaded.base_model_name_or_path.as_deref())?.with_context(|| {
            format!(
                "{} names no base model (base_model_name_or_path); pass --base",
                opts.adapter.display()
            )
        })?;
    let base_dir = crate::model::locate(&base_name, Path::new(&base_name), None)?;
    let stored = Weights::open(&base_dir, DType::F32, &device)?;
    let mut lm = CausalLm::load(
        ModelConfig::from_file(&base_dir.join("config.json"))?,
        &stored,
        &device,
    )?;
    let dtype = match opts.dtype {
        Some(d) => d,
        None => stored.stored_dtype().unwrap_or(DType::F32),
    };
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        bail!("cannot export in {dtype:?}; use f32, bf16 or f16");
    }
    loaded.apply(&mut lm)?;
    let deltas: BTreeMap<String, Tensor> = lm
        .linears()
        .into_iter()
        .filter_map(|(name, l)| l.lora.as_ref().map(|a| (format!("{name}.weight"), a)))
        .map(|(name, a)| Ok((name, a.delta_weight()?)))
        .collect::<Result<_>>()?;
    drop(lm);
    tracing::info!(
        "merging {} adapted projections on {}",
        deltas.len(),
        crate::device::describe(&device)
    );
    let staged = StagedDir::create(&opts.out, opts.force)?;
    // Each merged tensor leaves the device once it is cast, so a GPU holds the base and one tensor.
    let mut tensors = Vec::new();
    for name in stored.names() {
        let t = stored.get(&name, &stored_shape(&stored, &name)?)?;
        let t = match deltas.get(&name) {
            Some(d) => (t + d)?,
            None => t,
        };
        tensors.push((name, t.to_dtype(dtype)?.to_device(&Device::Cpu)?));
    }
    write_shards(staged.path(), tensors, opts.max_shard_bytes)?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base_dir.join("config.json"))?)?;
    if let Some(c) = config.as_object_mut() {
        let name = match dtype {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        };
        c.insert("torch_dtype".into(), name.into());
        c.remove("dtype");
    }
    write_atomic(
        &staged.path().join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    for f in COPIED {
        let src = base_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, staged.path().join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    let card =
        super::card::CardInput::gather(&opts.adapter, &base_name, super::card::Kind::Merged)?;
    write_atomic(&staged.path().join("README.md"), card.render().as_bytes())?;
    staged.commit()
}

/// The base to use: `--base`, else the adapter's; a `--base` whose name differs from the one the
/// adapter was trained on is refused unless `any_base` (the same model may live in another folder).
fn choose_base(opts: &MergeOptions, adapter_base: Option<&str>) -> Result<Option<String>> {
    let name = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(s)
            .to_lowercase()
    };
    match (&opts.base, adapter_base) {
        (Some(given), Some(trained)) if !opts.any_base && name(given) != name(trained) => bail!(
            "{} was trained on `{trained}`, but the base given is `{given}`: an adapter only fits the model it was trained on; pass --any-base if this is the same model under another name",
            opts.adapter.display()
        ),
        (Some(given), _) => Ok(Some(given.clone())),
        (None, trained) => Ok(trained.map(str::to_string)),
    }
}

fn stored_shape(weights: &Weights, name: &str) -> Result<Vec<usize>> {
    weights
        .shape_of(name)
        .with_context(|| format!("tensor {name} vanished from {}", weights.describe()))
}

/// Writes tensors in order into shards of at most `max_bytes` (one file when they fit), with
/// model.safetensors.index.json when there are several, as transformers' save_pretrained does.
pub fn write_shards(dir: &Path, tensors: Vec<(String, Tensor)>, max_bytes: u64) -> Result<()> {
    let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
    let total: u64 = tensors.iter().map(|(_, t)| size(t)).sum();
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0u64;
    for (name, t) in tensors {
        let s = size(&t);
        if current > 0 && current + s > max_bytes {
            shards.push(Vec::new());
            current = 0;
        }
        current += s;
        if let Some(last) = shards.last_mut() {
            last.push((name, t));
        }
    }
    if shards.len() == 1 {
        return save_safetensors(&shards[0], &dir.join("model.safetensors"));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for (name, _) in shard {
            weight_map.insert(name.clone(), file.clone().into());
        }
        save_safetensors(shard, &dir.join(&file))?;
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomic(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index)?.as_bytes(),
    )
}

/// Bytes of a size like `5GB`, `500MB`, `2GiB` or a plain number (transformers' max_shard_size).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("`{s}` is not a size; use e.g. 5GB or 500MB"))?;
    let factor: f64 = match unit.trim().to_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        other => bail!("unknown size unit `{other}` in `{s}`; use B, KB, MB, GB, KiB, MiB or GiB"),
    };
    if n <= 0.0 {
        bail!("max_shard_size must be positive, got `{s}`");
    }
    Ok((n * factor) as u64)
}

/// Copies an adapter folder (config and weights) with a model card, checking it loads on its base.
pub fn copy_adapter(opts: &MergeOptions) -> Result<PathBuf> {
    let loaded = adapter::load(&opts.adapter, &Device::Cpu)?;
    let base_name =
        choose_base(opts, loaded.base_model_name_or_path.as_deref())?.unwrap_or_default();
    if !base_name.is_empty() {
        let base_dir = crate::model::locate(&base_name, Path::new(&base_name), None)?;
        let weights = Weights::open(&base_dir, DType::F32, &Device::Cpu)?;
        let mut lm = CausalLm::load(
            ModelConfig::from_file(&base_dir.join("config.json"))?,
            &weights,
            &Device::Cpu,
        )?;
        loaded.apply(&mut lm)?;
    }
    let staged = StagedDir::create(&opts.out, opts.force)?;
    for f in [
        adapter::CONFIG_FILE,
        adapter::WEIGHTS_FILE,
        "recipe.resolved.toml",
        "metrics.jsonl",
    ] {
        let src = opts.adapter.join(f);
        if src.exists() {
            std::fs::copy(&src, staged.path().join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    let card =
        super::card::CardInput::gather(&opts.adapter, &base_name, super::card::Kind::Adapter)?;
    write_atomic(&staged.path().join("README.md"), card.render().as_bytes())?;
    staged.commit()
}
