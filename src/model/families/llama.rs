//! Llama 2 / 3 (and DeepSeek-R1-Distill-Llama): the reference decoder; optional biases, llama3 RoPE scaling.

use anyhow::Result;
use serde::Deserialize;
use serde_json::{json, Value};

use super::family::Family;
use crate::model::config::{parse_common, typed, ModelConfig};

/// Llama's own fields of config.json.
#[derive(Deserialize)]
struct Fields {
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
}

pub struct Llama;

impl Family for Llama {
    fn model_type(&self) -> &'static str {
        "llama"
    }
    fn architecture(&self) -> &'static str {
        "LlamaForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut c = parse_common(raw, self.model_type())?;
        let f: Fields = typed(raw)?;
        c.qkv_bias = f.attention_bias.unwrap_or(false);
        c.o_bias = c.qkv_bias;
        c.mlp_bias = f.mlp_bias.unwrap_or(false);
        Ok(c)
    }
    fn new_config_fields(&self, _layers: usize) -> Option<Value> {
        Some(
            json!({"attention_bias": false, "mlp_bias": false, "rope_scaling": null, "pretraining_tp": 1}),
        )
    }
}
