//! Qwen2 (and DeepSeek-R1-Distill-Qwen): the Llama decoder with biases on q/k/v.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::Family;
use crate::model::config::{parse_common, typed, ModelConfig};

/// Qwen2's own fields of config.json.
#[derive(Deserialize)]
struct Fields {
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    sliding_window: Option<usize>,
}

pub struct Qwen2;

impl Family for Qwen2 {
    fn model_type(&self) -> &'static str {
        "qwen2"
    }
    fn architecture(&self) -> &'static str {
        "Qwen2ForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut c = parse_common(raw, self.model_type())?;
        c.qkv_bias = true;
        c.sliding_window = sliding_window(raw, c.num_hidden_layers)?;
        Ok(c)
    }
    fn new_config_fields(&self, layers: usize) -> Value {
        json!({"rope_theta": 1_000_000.0, "use_sliding_window": false, "sliding_window": 4096, "max_window_layers": layers})
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}

/// The attention window of Qwen2 and Qwen3 configs: layers from `max_window_layers` on use the
/// sliding window (transformers' semantics); a window on only some layers is refused.
pub(super) fn sliding_window(raw: &Value, layers: usize) -> Result<Option<usize>> {
    let f: Fields = typed(raw)?;
    if !f.use_sliding_window.unwrap_or(false) {
        return Ok(None);
    }
    match f.max_window_layers.unwrap_or(0) {
        0 => Ok(f.sliding_window),
        some if some < layers => bail!("use_sliding_window on only some layers (max_window_layers {some} < num_hidden_layers {layers}) is not supported"),
        _ => Ok(None),
    }
}
