//! Model families: each file says how its config.json differs from the shared Llama-style decoder
//! and what `model new` writes for it. Adding a family is one new file plus one line in [`FAMILIES`].

mod gemma;
mod gemma2;
mod gemma3;
mod llama;
mod mistral;
mod phi3;
mod qwen2;
mod qwen3;

use anyhow::{bail, Result};
use serde_json::Value;

use super::config::ModelConfig;

/// What a family contributes: reading its config.json, and the names it is written under.
pub trait Family: Sync {
    /// `model_type` in config.json.
    fn model_type(&self) -> &'static str;
    /// `architectures[0]` in config.json for a causal LM.
    fn architecture(&self) -> &'static str;
    /// Parses config.json into the shared config, setting this family's flags.
    fn parse(&self, raw: &Value) -> Result<ModelConfig>;
    /// The fields `model new` writes into config.json beyond the shared shape (they replace
    /// shared ones of the same name), for a model of `layers` layers.
    fn new_config_fields(&self, layers: usize) -> Value;
    /// Whether the family's released models tie the LM head to the embeddings at every size.
    fn ties_embeddings(&self) -> bool {
        false
    }
}

const FAMILIES: &[&dyn Family] = &[
    &gemma2::Gemma2,
    &gemma3::Gemma3,
    &llama::Llama,
    &mistral::Mistral,
    &phi3::Phi3,
    &qwen2::Qwen2,
    &qwen3::Qwen3,
];

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

/// Which layers slide, from config.json's `layer_types` (transformers ≥ 4.53 writes it).
pub(super) fn sliding_layers(layer_types: &[String]) -> Result<Vec<bool>> {
    layer_types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => bail!("field `layer_types[{i}]`: `{other}` is not a layer type (sliding_attention, full_attention)"),
        })
        .collect()
}

/// The `model_type`s Feinschliff can load.
pub fn supported() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.model_type()).collect()
}
