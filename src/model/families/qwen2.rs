//! Qwen2 (and DeepSeek-R1-Distill-Qwen): the Llama decoder with biases on q/k/v and an optional
//! sliding window on the layers from `max_window_layers` on.

use anyhow::Result;
use serde::Deserialize;
use serde_json::{json, Value};

use super::family::Family;
use crate::model::config::{parse_common, typed, ModelConfig};

/// Qwen2's own fields of config.json.
#[derive(Deserialize)]
struct Fields {
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
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
        (c.sliding_window, c.sliding_layers) = sliding_window(raw, c.num_hidden_layers)?;
        Ok(c)
    }
    fn new_config_fields(&self, layers: usize) -> Option<Value> {
        Some(
            json!({"rope_theta": 1_000_000.0, "use_sliding_window": false, "sliding_window": 4096, "max_window_layers": layers}),
        )
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}

/// The attention window of Qwen2 and Qwen3 configs and the layers that use it, as transformers
/// reads them: no window unless `use_sliding_window`; then the layers `layer_types` names, or
/// (without it) those from `max_window_layers` (default 28) on.
pub(super) fn sliding_window(
    raw: &Value,
    layers: usize,
) -> Result<(Option<usize>, Option<Vec<bool>>)> {
    let f: Fields = typed(raw)?;
    if !f.use_sliding_window.unwrap_or(false) || f.sliding_window.is_none() {
        return Ok((None, None));
    }
    let sliding = match f.layer_types {
        Some(types) => super::family::sliding_layers(&types)?,
        None => {
            let first = f.max_window_layers.unwrap_or(28);
            (0..layers).map(|i| i >= first).collect()
        }
    };
    Ok((f.sliding_window, Some(sliding)))
}
