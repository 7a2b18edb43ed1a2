//! Phi-3 / Phi-3.5-mini / Phi-4-mini: the Llama decoder with q/k/v fused into `qkv_proj` and
//! gate/up into `gate_up_proj` (LoRA attaches to the fused modules, as PEFT does), partial
//! rotary embeddings (`partial_rotary_factor`), LongRoPE scaling and an optional sliding window.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::family::Family;
use crate::model::config::{parse_common, refuse_dropout, typed, ModelConfig, RopeScaling};

/// Phi-3's own fields of config.json.
#[derive(Deserialize)]
struct Fields {
    sliding_window: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    resid_pdrop: Option<f64>,
    embd_pdrop: Option<f64>,
    attention_dropout: Option<f64>,
}

pub struct Phi3;

impl Family for Phi3 {
    fn model_type(&self) -> &'static str {
        "phi3"
    }
    fn architecture(&self) -> &'static str {
        "Phi3ForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut c = parse_common(raw, self.model_type())?;
        let f: Fields = typed(raw)?;
        for (name, p) in [
            ("resid_pdrop", f.resid_pdrop),
            ("embd_pdrop", f.embd_pdrop),
            ("attention_dropout", f.attention_dropout),
        ] {
            refuse_dropout(name, p)?;
        }
        if matches!(c.rope_scaling, RopeScaling::LongRope { .. })
            && f.original_max_position_embeddings.is_none()
        {
            bail!("field `original_max_position_embeddings` is missing: longrope scaling switches its factors at that length; set it to the context the model was pre-trained with (4096 for Phi-3/3.5/4-mini)");
        }
        c.fused_projections = true;
        c.sliding_window = f.sliding_window;
        Ok(c)
    }
    fn new_config_fields(&self, _layers: usize) -> Option<Value> {
        Some(json!({
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "partial_rotary_factor": 0.75,
            "original_max_position_embeddings": 2048,
            "rope_scaling": null,
            "sliding_window": null,
        }))
    }
}
