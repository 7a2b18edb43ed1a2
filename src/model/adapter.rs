//! LoRA adapters on a model: attaching fresh ones to the targeted projections, and PEFT's on-disk
//! format, `adapter_config.json` and `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r].

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use super::base::BaseModel;
use super::decoder::CausalLm;
use super::lora::{LoraAdapter, LoraConfig, TargetModules};
use super::text_model::TextModel;
use super::weights::save_safetensors;

pub const CONFIG_FILE: &str = "adapter_config.json";
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// What PEFT's state-dict keys put before a module's name.
const PEFT_PREFIX: &str = "base_model.model.";

/// The PEFT state-dict key of a module's LoRA matrix (`part` is `lora_A` or `lora_B`).
pub fn peft_key(module: &str, part: &str) -> String {
    format!("{PEFT_PREFIX}{module}.{part}.weight")
}

/// Whether the module of a PEFT key (or key prefix) lies outside the text model of a multimodal
/// checkpoint (a vision tower's or projector's), where Feinschliff loads no layer.
fn outside_text_model(text: TextModel, key: &str) -> bool {
    text.is_nested()
        && text
            .module_name(key.trim_start_matches(PEFT_PREFIX))
            .is_none()
}

/// adapter_config.json as PEFT writes it for a plain LoRA adapter; the base is named by its Hub
/// id and revision (or its folder's name), never by a local path.
pub fn config_json(config: &LoraConfig, target_modules: &TargetModules, base: &BaseModel) -> Value {
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base.name(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "revision": base.revision,
        "target_modules": target_modules,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": config.use_rslora,
    })
}

/// Writes the adapters of `lm`, made with `config` on `base`, into `dir` (which must exist).
pub fn save(lm: &CausalLm, config: &LoraConfig, base: &BaseModel, dir: &Path) -> Result<()> {
    let tensors: Vec<(String, Tensor)> = trainable(lm)
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    save_safetensors(&tensors, &dir.join(WEIGHTS_FILE))?;
    let json = config_json(config, &saved_targets(lm), base);
    crate::fsutil::write_atomic(
        &dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )
}

/// adapter_config.json's `target_modules` for the adapters of `lm`: their short names, as PEFT
/// matches them anywhere in the model; for the language model of a multimodal checkpoint a
/// pattern on its layers in both spellings (`(?:model\.language_model|language_model\.model)\.
/// layers\.\d+\.(?:self_attn\.q_proj|...)`), so that PEFT leaves the vision tower's `q_proj`s alone.
fn saved_targets(lm: &CausalLm) -> TargetModules {
    let text = lm.config.text_model;
    if !text.is_nested() {
        return TargetModules::Names(adapted_module_names(lm));
    }
    let roles: BTreeSet<&str> = lm
        .layers
        .iter()
        .flat_map(|l| l.projections())
        .filter(|(_, l)| l.lora.is_some())
        .map(|(role, _)| role.path())
        .collect();
    let alternatives = |names: Vec<String>| {
        names
            .iter()
            .map(|n| regex::escape(n))
            .collect::<Vec<_>>()
            .join("|")
    };
    TargetModules::Pattern(format!(
        r"(?:{})\.\d+\.(?:{})",
        alternatives(text.spellings(&format!("{}.layers", text.decoder))),
        alternatives(roles.into_iter().map(str::to_string).collect())
    ))
}

/// The short module names that carry adapters (`q_proj`, ...), sorted.
pub fn adapted_module_names(lm: &CausalLm) -> Vec<String> {
    let mut names: Vec<String> = lm
        .linears()
        .into_iter()
        .filter(|(_, l)| l.lora.is_some())
        .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_string))
        .collect();
    names.sort();
    names.dedup();
    names
}

/// An adapter read from disk: its config and tensors.
pub struct LoadedAdapter {
    pub config: LoraConfig,
    tensors: HashMap<String, Tensor>,
    /// The adapter folder, for messages.
    dir: PathBuf,
}

/// Keys that change the maths of the adapter; anything but their neutral value is refused.
const REFUSED: &[(&str, &str)] = &[
    ("use_dora", "DoRA adapters are not supported"),
    (
        "fan_in_fan_out",
        "fan_in_fan_out (Conv1D-style weights) is not supported",
    ),
    (
        "layers_to_transform",
        "adapters on a subset of layers are not supported",
    ),
    (
        "rank_pattern",
        "per-module ranks (rank_pattern) are not supported",
    ),
    (
        "alpha_pattern",
        "per-module alphas (alpha_pattern) are not supported",
    ),
    (
        "modules_to_save",
        "fully trained extra modules (modules_to_save) are not supported",
    ),
];

/// Keys of adapter_config.json that Feinschliff reads or that carry no maths (metadata).
const UNDERSTOOD: &[&str] = &[
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "bias",
    "base_model_name_or_path",
    "revision",
    "inference_mode",
    "init_lora_weights",
    "peft_version",
    "megatron_core",
    "qalora_group_size",
    "loftq_config",
];

/// The fields of adapter_config.json that set the adapter's maths (besides `target_modules`), typed:
/// one of the wrong type is an error naming it.
#[derive(Deserialize)]
struct Fields {
    peft_type: Option<String>,
    r: Option<usize>,
    lora_alpha: Option<f64>,
    lora_dropout: Option<f64>,
    use_rslora: Option<bool>,
    bias: Option<String>,
}

/// The adapter_config.json of an adapter folder as a JSON object.
pub fn read_config(dir: &Path) -> Result<Map<String, Value>> {
    let config_path = dir.join(CONFIG_FILE);
    let text = crate::fsutil::read_text(&config_path, "adapter config")?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a JSON object", config_path.display()))
}

/// Reads a PEFT LoRA adapter folder (made by Feinschliff, PEFT, Axolotl, Unsloth, ...).
pub fn load(dir: &Path, device: &Device) -> Result<LoadedAdapter> {
    let config_path = dir.join(CONFIG_FILE);
    let raw = read_config(dir)?;
    let ctx = || format!("in adapter config {}", config_path.display());
    let fields: Fields =
        crate::model::config::typed(&Value::Object(raw.clone())).with_context(ctx)?;
    let peft_type = fields.peft_type.as_deref().unwrap_or("LORA");
    if peft_type != "LORA" {
        bail!(
            "{}: peft_type `{peft_type}` is not supported (only LORA)",
            ctx()
        );
    }
    for (key, why) in REFUSED {
        let neutral = match raw.get(*key) {
            None | Some(Value::Null) | Some(Value::Bool(false)) => true,
            Some(Value::Object(o)) => o.is_empty(),
            Some(Value::Array(a)) => a.is_empty(),
            _ => false,
        };
        if !neutral {
            bail!("{}: {why} (`{key}` = {})", ctx(), raw[*key]);
        }
    }
    for (key, value) in &raw {
        let neutral = matches!(value, Value::Null | Value::Bool(false))
            || value.as_object().is_some_and(|o| o.is_empty())
            || value.as_array().is_some_and(|a| a.is_empty());
        if !UNDERSTOOD.contains(&key.as_str()) && !REFUSED.iter().any(|(k, _)| k == key) && !neutral
        {
            tracing::warn!(
                "{}: key `{key}` = {value} is not used by Feinschliff and was ignored",
                config_path.display()
            );
        }
    }
    if let Some(bias) = fields.bias.as_deref().filter(|b| *b != "none") {
        bail!("{}: bias `{bias}` is not supported (only \"none\")", ctx());
    }
    let r = match fields.r {
        None => bail!(
            "{}: `r` is missing: add the adapter's rank (the first dimension of its lora_A tensors)",
            ctx()
        ),
        Some(0) => bail!(
            "{}: `r` is 0, but a LoRA rank is at least 1: set it to the adapter's rank (the first dimension of its lora_A tensors)",
            ctx()
        ),
        Some(r) => r,
    };
    let Some(alpha) = fields.lora_alpha else {
        bail!(
            "{}: `lora_alpha` is missing: the adapter's scale is lora_alpha / r and Feinschliff does not guess it; add the value it was trained with (PEFT's default is 8)",
            ctx()
        );
    };
    let target_modules: TargetModules = serde_json::from_value(
        raw.get("target_modules")
            .cloned()
            .with_context(|| format!("{}: `target_modules` is missing", ctx()))?,
    )
    .with_context(|| {
        format!(
            "{}: `target_modules` must be a list of names or a string",
            ctx()
        )
    })?;
    let config = LoraConfig {
        r,
        alpha,
        dropout: fields.lora_dropout.unwrap_or(0.0),
        target_modules,
        use_rslora: fields.use_rslora.unwrap_or(false),
    };
    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() {
        bail!(
            "{} is missing (only safetensors adapters are supported)",
            weights_path.display()
        );
    }
    let tensors = candle_core::safetensors::load(&weights_path, device)
        .with_context(|| format!("cannot read {}", weights_path.display()))?;
    // Some tools keep the adapter name in the key (`lora_A.default.weight`); PEFT's saved form drops it.
    let tensors = tensors
        .into_iter()
        .map(|(k, v)| {
            (
                k.replace(".lora_A.default.", ".lora_A.")
                    .replace(".lora_B.default.", ".lora_B."),
                v,
            )
        })
        .collect();
    Ok(LoadedAdapter {
        config,
        tensors,
        dir: dir.to_path_buf(),
    })
}

impl LoadedAdapter {
    /// Attaches the adapter's A/B to `lm`, checking that every targeted layer has both with the right
    /// shapes; returns the adapter's config. Errors name the adapter's files.
    pub fn apply(self, lm: &mut CausalLm) -> Result<LoraConfig> {
        let mut tensors = self.tensors;
        let config = self.config;
        let weights = self.dir.join(WEIGHTS_FILE);
        let weights = weights.display();
        let mut attached = 0;
        let master = super::kernels::accumulation_dtype(lm.dtype());
        let text = lm.config.text_model;
        for (i, (name, linear)) in lm.linears_mut().into_iter().enumerate() {
            // The module's keys in the first of its spellings the adapter uses.
            let keys = text
                .spellings(&name)
                .into_iter()
                .map(|n| (peft_key(&n, "lora_A"), peft_key(&n, "lora_B")))
                .collect::<Vec<_>>();
            let (ka, kb) = keys
                .iter()
                .find(|(ka, kb)| tensors.contains_key(ka) || tensors.contains_key(kb))
                .unwrap_or(&keys[0])
                .clone();
            match (tensors.remove(&ka), tensors.remove(&kb)) {
                (Some(a), Some(b)) => {
                    if let ([rank_a, _], [_, rank_b]) = (a.dims(), b.dims()) {
                        if rank_a == rank_b && *rank_a != config.r {
                            bail!(
                                "{weights}: the tensors of {name} have rank {rank_a}, but {} says r = {}: set `r` to the adapter's rank",
                                self.dir.join(CONFIG_FILE).display(),
                                config.r
                            );
                        }
                    }
                    let want_a = [config.r, linear.in_features()];
                    let want_b = [linear.out_features(), config.r];
                    if a.dims() != want_a || b.dims() != want_b {
                        bail!(
                            "{weights}: adapter tensor shapes for {name} are A {:?}, B {:?}; the base model needs A {want_a:?}, B {want_b:?}: the adapter was made for another base model",
                            a.dims(),
                            b.dims()
                        );
                    }
                    linear.lora = Some(LoraAdapter::from_tensors(&config, a, b, master, i as u64)?);
                    attached += 1;
                }
                (None, None) => {}
                _ => bail!("{weights} has only one of {ka} and {kb}"),
            }
        }
        skip_inert(&mut tensors, text, &weights.to_string())?;
        if let Some(extra) = tensors.keys().next() {
            if outside_text_model(text, extra) {
                bail!("{weights}: adapter tensor `{extra}` adapts a module outside the language model (the vision tower or projector), with a non-zero lora_B: Feinschliff loads and fine-tunes only the language model of a multimodal checkpoint, so it cannot apply this adapter");
            }
            bail!("{weights}: adapter tensor `{extra}` matches no layer of the base model: the adapter was made for another base model (or targets unsupported modules)");
        }
        if attached == 0 {
            bail!("{weights} holds no LoRA tensors");
        }
        Ok(config)
    }
}

/// Removes the LoRA pairs left in `tensors` that lie outside the text model of a multimodal
/// checkpoint and whose lora_B is zero: they change nothing. PEFT attaches such pairs to the
/// vision tower when `target_modules` names `q_proj` or `all-linear`, and text-only training
/// leaves their B at its initial zero. `weights` names the adapter file in the warning.
fn skip_inert(tensors: &mut HashMap<String, Tensor>, text: TextModel, weights: &str) -> Result<()> {
    let mut inert = Vec::new();
    for (key, b) in tensors.iter() {
        let Some(module) = key.strip_suffix(".lora_B.weight") else {
            continue;
        };
        if outside_text_model(text, module)
            && b.to_dtype(DType::F32)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?
                == 0.0
        {
            inert.push(module.to_string());
        }
    }
    if inert.is_empty() {
        return Ok(());
    }
    inert.sort();
    for module in &inert {
        tensors.remove(&format!("{module}.lora_A.weight"));
        tensors.remove(&format!("{module}.lora_B.weight"));
    }
    tracing::warn!(
        "{weights}: skipped {} LoRA pairs on modules the model does not load (e.g. `{}`): their lora_B is zero, so they change nothing",
        inert.len(),
        inert[0].trim_start_matches(PEFT_PREFIX)
    );
    Ok(())
}

/// Attaches freshly initialised adapters to the layers of `lm` that `config` targets.
pub fn attach(lm: &mut CausalLm, config: &LoraConfig, seed: u64) -> Result<()> {
    if config.r == 0 {
        bail!("lora r must be at least 1");
    }
    let names: Vec<String> = lm.linears().into_iter().map(|(n, _)| n).collect();
    config.target_modules.resolve(&names)?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let device = lm.device().clone();
    // Master weights in f32 whatever the base dtype (f64 only for an f64 model, e.g. gradient checks).
    let master = super::kernels::accumulation_dtype(lm.dtype());
    for (name, linear) in lm.linears_mut() {
        if config.target_modules.matches(&name)? {
            let (i, o) = (linear.in_features(), linear.out_features());
            let mut adapter = LoraAdapter::init(config, i, o, &mut rng, &device)?;
            if master == DType::F64 {
                adapter = LoraAdapter::from_tensors(
                    config,
                    adapter.a.as_tensor().clone(),
                    adapter.b.as_tensor().clone(),
                    master,
                    adapter.dropout_seed,
                )?;
            }
            linear.lora = Some(adapter);
        }
    }
    Ok(())
}

/// The adapters' variables with their PEFT names, in layer order (A before B).
pub fn trainable(lm: &CausalLm) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (name, linear) in lm.linears() {
        if let Some(l) = &linear.lora {
            out.push((peft_key(&name, "lora_A"), l.a.clone()));
            out.push((peft_key(&name, "lora_B"), l.b.clone()));
        }
    }
    out
}
