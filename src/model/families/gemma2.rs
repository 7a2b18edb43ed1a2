//! Gemma 2: the shared Gemma decoder (see [`super::gemma`]) with attention scores soft-capped at
//! 50 and logits at 30 unless config.json says otherwise, and a sliding window on every other
//! layer.

use anyhow::Result;
use serde_json::{json, Value};

use super::family::Family;
use super::gemma::{self, Defaults};
use crate::model::config::ModelConfig;

/// Gemma2Config's shape: Gemma 2 2B.
const SHAPE: [(&str, usize); 7] = gemma::shape(256_000, 8192);

pub struct Gemma2;

impl Family for Gemma2 {
    fn model_type(&self) -> &'static str {
        "gemma2"
    }
    fn architecture(&self) -> &'static str {
        "Gemma2ForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let defaults = Defaults {
            rope_theta: 10_000.0,
            attn_logit_softcapping: Some(50.0),
            final_logit_softcapping: Some(30.0),
            sliding_window_pattern: 2,
            shape: &SHAPE,
        };
        gemma::parse(raw, self.model_type(), &defaults)
    }
    fn new_config_fields(&self, _layers: usize) -> Option<Value> {
        Some(json!({
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 64,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 4096,
            "attention_bias": false,
            "cache_implementation": "hybrid",
        }))
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}
