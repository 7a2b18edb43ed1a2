//! Model families: each file says how its config.json differs from the shared Llama-style decoder
//! and what `model new` writes for it. Adding a family is one new file plus one line in [`FAMILIES`].

mod family;
mod gemma;
mod gemma2;
mod gemma3;
mod gemma3_multimodal;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::Value;
use std::path::Path;

use super::config::{typed, ModelConfig};
pub use family::Family;

const FAMILIES: &[&dyn Family] = &[
    &gemma2::Gemma2,
    &gemma3_multimodal::Gemma3Multimodal,
    &gemma3::Gemma3,
    &llama::Llama,
    &mistral::Mistral,
    &phi3::Phi3,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
];

/// Reading config.json is choosing the family by `model_type` and letting it parse.
impl ModelConfig {
    /// Reads and validates `config.json`; `path` is only used in error messages.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path, "model config")?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&raw).with_context(|| format!("in model config {}", path.display()))
    }

    /// Builds the config from parsed config.json, dispatching on `model_type`.
    pub fn from_json(raw: &Value) -> Result<Self> {
        #[derive(Deserialize)]
        struct ModelType {
            model_type: String,
        }
        let ModelType { model_type } = typed(raw)?;
        let family = by_model_type(&model_type)?;
        let config = family.parse(raw)?;
        config.validate()?;
        Ok(config)
    }
}

/// The family for a config.json `model_type`.
pub fn by_model_type(model_type: &str) -> Result<&'static dyn Family> {
    match FAMILIES.iter().find(|f| f.model_type() == model_type) {
        Some(f) => Ok(*f),
        None => bail!(
            "model_type `{model_type}` is not supported; supported: {}",
            supported().join(", ")
        ),
    }
}

/// The `model_type`s Feinschliff can load.
pub fn supported() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type()).collect()
}

/// The `model_type`s `model new` (and `bench`) can write a complete checkpoint of.
pub fn writable() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .filter(|f| f.new_config_fields(1).is_some())
        .map(|f| f.model_type())
        .collect()
}
