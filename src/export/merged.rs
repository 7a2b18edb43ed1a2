//! Merging an adapter into its base: W' = W + s·B·A for every adapted projection, written as a
//! full checkpoint (sharded safetensors with an index, config, tokenizer and generation files)
//! that transformers loads as is. Every other tensor, a multimodal model's vision tower and
//! projector included, is written as stored (converted only when `--dtype` asks).

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::fsutil::{write_atomic, StagedDir};
use crate::model::kernels::projection_weight::ProjectionWeight;
use crate::model::kernels::quant::Quantization;
use crate::model::weights::{save_safetensors, Weights};
use crate::model::{adapter, BaseModel, CausalLm, ModelTokenizer, Parts};
use crate::progress::{Progress, Unit};
use crate::recipe::Recipe;

/// What to merge and how to write it.
pub struct MergeOptions {
    pub adapter: PathBuf,
    pub out: PathBuf,
    pub dtype: Option<DType>,
    /// Largest shard in bytes.
    pub max_shard_bytes: u64,
    /// Where the merge is computed: `auto`, `cpu` or `cuda:N`.
    pub device: String,
    pub force: bool,
    /// Safetensors shards in Hugging Face layout, or one GGUF file.
    pub format: Format,
}

/// What a merged model is written as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Safetensors,
    /// `model-<quant>.gguf` for llama.cpp, with the tokenizer and chat template in its metadata.
    Gguf(crate::model::gguf::Quant),
}

/// Files copied from the base model as they are (the processor's too, for a multimodal model).
const COPIED: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
    "processor_config.json",
];

/// Writes base + adapter as one full model; its card names the base by [`BaseModel::name`].
pub fn merge(opts: &MergeOptions, base: &BaseModel) -> Result<PathBuf> {
    let device = crate::device::open(&opts.device)?;
    let loaded = adapter::load(&opts.adapter, &device)?;
    let base_dir = &base.dir;
    let parts = Parts::open(base_dir, DType::F32, &device)?;
    let stored = parts.weights;
    let quantize = trained_quantization(&opts.adapter)?;
    let mut lm = CausalLm::load_quantized(parts.config.clone(), &stored, &device, quantize)?;
    let dtype = match (opts.dtype, quantize, stored.stored_dtype()) {
        (Some(d), _, _) => d,
        // A quantized base is dequantised to 16 bits, as PEFT merges into a 4-bit base.
        (None, Some(_), Some(DType::F16)) => DType::F16,
        (None, Some(_), _) => DType::BF16,
        (None, None, stored) => stored.unwrap_or(DType::F32),
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
    // The projections the adapter was trained against quantized: merged into their dequantised
    // values, not into the weights as stored.
    let quantized: BTreeMap<String, ProjectionWeight> = lm
        .linears()
        .into_iter()
        .filter(|(_, l)| l.weight.quantized().is_some())
        .map(|(name, l)| (format!("{name}.weight"), l.weight.clone()))
        .collect();
    drop(lm);
    if let Some(q) = quantize {
        tracing::info!(
            "the adapter was trained on the base quantized to {q} (its recipe.resolved.toml): {} projections are merged into their dequantised weights",
            quantized.len()
        );
    }
    tracing::info!(
        "merging {} adapted projections on {}",
        deltas.len(),
        crate::device::describe(&device)
    );
    let gguf = match opts.format {
        Format::Gguf(quant) => {
            if opts.dtype.is_some() {
                bail!("--dtype applies to safetensors exports; a GGUF export's types come from --quant (f16, q8_0, q4_k_m)");
            }
            let Some(tokenizer) = &parts.tokenizer else {
                bail!(
                    "a GGUF export needs the base's tokenizer; {} has no tokenizer.json",
                    base_dir.display()
                );
            };
            Some((quant, tokenizer))
        }
        Format::Safetensors => None,
    };
    let staged = StagedDir::create(&opts.out, opts.force)?;
    let text = parts.config.text_model;
    // Each merged tensor leaves the device once it is cast, so a GPU holds the base and one tensor.
    let merged = |dtype: DType| -> Result<Vec<(String, Tensor)>> {
        let names = stored.names();
        let progress = Progress::new(
            format!("merging into {}", opts.out.display()),
            names.len() as u64,
            Unit::Items("tensors"),
        );
        let tensors = names
            .into_iter()
            .map(|name| {
                // Deltas are keyed by module names; tensors outside the text model (a vision
                // tower's) have none and are copied as stored.
                let module = text.module_name(&name);
                let module = module.as_deref().unwrap_or(&name);
                let t = match quantized.get(module).and_then(ProjectionWeight::quantized) {
                    Some(q) => q.dequantize()?,
                    None => stored.get(&name, &stored_shape(&stored, &name)?)?,
                };
                let t = match deltas.get(module) {
                    Some(d) => (t + d)?,
                    None => t,
                };
                progress.inc(1);
                Ok((name, t.to_dtype(dtype)?.to_device(&Device::Cpu)?))
            })
            .collect();
        progress.finish();
        tensors
    };
    if let Some((quant, tokenizer)) = gguf {
        let file = staged.path().join(format!("model-{}.gguf", quant.name()));
        let name = base.name();
        let tensors = merged(DType::F32)?;
        crate::model::gguf::write(&file, &name, &parts.config, tokenizer, tensors, quant)?;
        super::card::write(
            staged.path(),
            &opts.adapter,
            &name,
            // The GGUF holds the language model alone.
            super::card::Kind::Merged { multimodal: false },
        )?;
        return staged.commit();
    }
    let tensors = merged(dtype)?;
    write_shards(staged.path(), tensors, opts.max_shard_bytes)?;
    let mut config = parts.config_json;
    if let Some(c) = config.as_object_mut() {
        // transformers' record of where the base was loaded from: a local path, or the base's id.
        c.remove("_name_or_path");
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
    if let (false, Some(tokenizer)) = (base_dir.is_dir(), &parts.tokenizer) {
        write_tokenizer(tokenizer, staged.path())?;
    } else {
        for f in COPIED {
            let src = base_dir.join(f);
            if src.exists() {
                std::fs::copy(&src, staged.path().join(f))
                    .with_context(|| format!("cannot copy {}", src.display()))?;
            }
        }
    }
    super::card::write(
        staged.path(),
        &opts.adapter,
        &base.name(),
        super::card::Kind::Merged {
            multimodal: parts.config.text_model.is_nested(),
        },
    )?;
    staged.commit()
}

/// The quantization of the base the adapter in `dir` was trained on: `[model] quantize` of its
/// recipe.resolved.toml (None without one: an adapter made elsewhere, or on a dense base).
fn trained_quantization(dir: &Path) -> Result<Option<Quantization>> {
    let path = dir.join("recipe.resolved.toml");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let recipe: Recipe = toml::from_str(&text)
        .with_context(|| format!("{} is not a Feinschliff recipe", path.display()))?;
    Ok(recipe.model.quantize)
}

/// tokenizer.json and tokenizer_config.json of a tokenizer that has no files of its own (a GGUF base's).
fn write_tokenizer(tokenizer: &ModelTokenizer, dir: &Path) -> Result<()> {
    let json = tokenizer
        .inner
        .to_string(true)
        .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?;
    write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "chat_template": tokenizer.chat_template,
        "clean_up_tokenization_spaces": false,
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )
}

/// The base of an export, located once: `given` (`--base`), else the adapter's
/// base_model_name_or_path (at its revision). A given base whose name differs from the adapter's is
/// refused unless `any_base` (the same model may live in another folder); a local folder with no
/// Hub id of its own takes the adapter's when that is one.
pub fn locate_base(adapter_dir: &Path, given: Option<&str>, any_base: bool) -> Result<BaseModel> {
    let config = adapter::read_config(adapter_dir)?;
    let field = |key: &str| config.get(key).and_then(|v| v.as_str());
    let trained = field("base_model_name_or_path");
    let name = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(s)
            .to_lowercase()
    };
    let (base, revision) = match (given, trained) {
        (Some(given), Some(trained)) if !any_base && name(given) != name(trained) => bail!(
            "{} was trained on `{trained}`, but the base given is `{given}`: an adapter only fits the model it was trained on; pass --any-base if this is the same model under another name",
            adapter_dir.display()
        ),
        (Some(given), _) => (given, None),
        (None, Some(trained)) => (trained, field("revision")),
        (None, None) => bail!(
            "{} names no base model (base_model_name_or_path); pass --base",
            adapter_dir.display()
        ),
    };
    let mut located =
        crate::model::locate(base, Path::new(base), revision, None).with_context(|| {
            format!(
                "base model `{base}` of {} (--base DIR takes a local copy)",
                adapter_dir.display()
            )
        })?;
    if located.hub_id.is_none() {
        if let Some(id) = trained.filter(|t| crate::hub::is_repo_id(t)) {
            located.hub_id = Some(id.to_string());
            located.revision = field("revision").map(str::to_string);
        }
    }
    Ok(located)
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

/// Copies an adapter folder (config and weights) with a model card, checking it loads on `base`;
/// adapter_config.json and recipe.resolved.toml name the base by [`BaseModel::name`].
pub fn copy_adapter(opts: &MergeOptions, base: &BaseModel) -> Result<PathBuf> {
    let loaded = adapter::load(&opts.adapter, &Device::Cpu)?;
    let parts = Parts::open(&base.dir, DType::F32, &Device::Cpu)?;
    let mut lm = CausalLm::load(parts.config, &parts.weights, &Device::Cpu)?;
    loaded.apply(&mut lm)?;
    let staged = StagedDir::create(&opts.out, opts.force)?;
    let mut config = adapter::read_config(&opts.adapter)?;
    config.insert("base_model_name_or_path".into(), base.name().into());
    config.insert("revision".into(), base.revision.clone().into());
    write_atomic(
        &staged.path().join(adapter::CONFIG_FILE),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    for f in [adapter::WEIGHTS_FILE, "metrics.jsonl"] {
        let src = opts.adapter.join(f);
        if src.exists() {
            std::fs::copy(&src, staged.path().join(f))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    let recipe_path = opts.adapter.join("recipe.resolved.toml");
    if recipe_path.exists() {
        let text = std::fs::read_to_string(&recipe_path)
            .with_context(|| format!("cannot read {}", recipe_path.display()))?;
        let recipe: Recipe = toml::from_str(&text)
            .with_context(|| format!("{} is not a Feinschliff recipe", recipe_path.display()))?;
        write_atomic(
            &staged.path().join("recipe.resolved.toml"),
            recipe.naming_base(base).to_toml()?.as_bytes(),
        )?;
    }
    super::card::write(
        staged.path(),
        &opts.adapter,
        &base.name(),
        super::card::Kind::Adapter,
    )?;
    staged.commit()
}
