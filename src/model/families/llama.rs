//! Llama 2 / 3 (and DeepSeek-R1-Distill-Llama): the reference decoder; optional biases, llama3 RoPE scaling.

use anyhow::Result;
use serde_json::Value;

use super::Family;
use crate::model::config::{parse_common, ModelConfig};

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
        let attention_bias = raw
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        c.qkv_bias = attention_bias;
        c.o_bias = attention_bias;
        c.mlp_bias = raw
            .get("mlp_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(c)
    }
}
