//! Mistral: the Llama decoder with an optional sliding attention window and explicit head_dim.

use anyhow::Result;
use serde::Deserialize;
use serde_json::{json, Value};

use super::family::Family;
use crate::model::config::{parse_common, typed, ModelConfig};

/// Mistral's own field of config.json.
#[derive(Deserialize)]
struct Fields {
    sliding_window: Option<usize>,
}

pub struct Mistral;

impl Family for Mistral {
    fn model_type(&self) -> &'static str {
        "mistral"
    }
    fn architecture(&self) -> &'static str {
        "MistralForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut c = parse_common(raw, self.model_type())?;
        c.sliding_window = typed::<Fields>(raw)?.sliding_window;
        Ok(c)
    }
    fn new_config_fields(&self, _layers: usize) -> Option<Value> {
        Some(json!({"sliding_window": null}))
    }
}
