//! Qwen3: the Llama decoder with an RMSNorm over each query and key head before RoPE
//! (`q_norm`, `k_norm`), an explicit head_dim, and optional biases on the attention projections.

use anyhow::Result;
use serde::Deserialize;
use serde_json::{json, Value};

use super::family::Family;
use crate::model::config::{parse_common, typed, ModelConfig};

/// Qwen3's own field of config.json.
#[derive(Deserialize)]
struct Fields {
    attention_bias: Option<bool>,
}

pub struct Qwen3;

impl Family for Qwen3 {
    fn model_type(&self) -> &'static str {
        "qwen3"
    }
    fn architecture(&self) -> &'static str {
        "Qwen3ForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut c = parse_common(raw, self.model_type())?;
        c.qkv_bias = typed::<Fields>(raw)?.attention_bias.unwrap_or(false);
        c.o_bias = c.qkv_bias;
        c.qk_norm = true;
        (c.sliding_window, c.sliding_layers) =
            super::qwen2::sliding_window(raw, c.num_hidden_layers)?;
        Ok(c)
    }
    fn new_config_fields(&self, layers: usize) -> Option<Value> {
        Some(
            json!({"rope_theta": 1_000_000.0, "attention_bias": false, "use_sliding_window": false, "sliding_window": null, "max_window_layers": layers}),
        )
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}
