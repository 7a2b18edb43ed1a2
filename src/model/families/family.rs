//! What a family file declares ([`Family`]), and the config readers that families share.

use anyhow::{bail, Result};
use serde_json::Value;

use crate::model::config::ModelConfig;

/// What a family contributes: reading its config.json, and the names it is written under.
pub trait Family: Sync {
    /// `model_type` in config.json.
    fn model_type(&self) -> &'static str;
    /// `architectures[0]` in config.json for a causal LM.
    fn architecture(&self) -> &'static str;
    /// Parses config.json into the shared config, setting this family's flags.
    fn parse(&self, raw: &Value) -> Result<ModelConfig>;
    /// The fields `model new` writes into config.json beyond the shared shape (they replace
    /// shared ones of the same name), for a model of `layers` layers; None for a family whose
    /// checkpoints `model new` cannot write.
    fn new_config_fields(&self, layers: usize) -> Option<Value>;
    /// Whether the family's released models tie the LM head to the embeddings at every size.
    fn ties_embeddings(&self) -> bool {
        false
    }
}

/// Which layers slide, from config.json's `layer_types` (transformers ≥ 4.53 writes it).
pub(crate) fn sliding_layers(layer_types: &[String]) -> Result<Vec<bool>> {
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
