//! Gemma 3 text (`gemma3_text`, Gemma3ForCausalLM): the shared Gemma decoder (see
//! [`super::gemma`]) with q_norm/k_norm ((1 + w) RMSNorm per head before RoPE), no soft caps
//! unless config.json sets them, five sliding-window layers to one global layer, and RoPE base
//! `rope_local_base_freq` (unscaled) on the sliding layers, `rope_theta` with `rope_scaling` on the
//! global ones. It is also the language model of the multimodal checkpoints (see
//! [`super::gemma3_multimodal`]).

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::family::Family;
use super::gemma::{self, Defaults};
use crate::model::config::{typed, ModelConfig};

/// Gemma 3's own fields of config.json (transformers 4.x layout).
#[derive(Deserialize)]
struct Fields {
    rope_local_base_freq: Option<f64>,
}

/// transformers 5 nests `rope_parameters` by layer type.
#[derive(Deserialize)]
struct PerLayerType {
    full_attention: Value,
    sliding_attention: Option<LocalRope>,
}

/// The sliding layers' RoPE in transformers 5's layout.
#[derive(Deserialize)]
struct LocalRope {
    rope_type: Option<String>,
    rope_theta: Option<f64>,
}

/// Gemma3TextConfig's shape (which multimodal configs rely on: their `text_config` names only
/// what differs).
const SHAPE: [(&str, usize); 7] = gemma::shape(262_208, 131_072);

pub struct Gemma3;

impl Family for Gemma3 {
    fn model_type(&self) -> &'static str {
        "gemma3_text"
    }
    fn architecture(&self) -> &'static str {
        "Gemma3ForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut raw = raw.clone();
        let nested = raw
            .get("rope_parameters")
            .is_some_and(|p| p.get("full_attention").is_some());
        let local_theta = if nested {
            let per: PerLayerType = typed(&raw["rope_parameters"])
                .context("in field `rope_parameters` (by layer type)")?;
            let local = per.sliding_attention.unwrap_or(LocalRope {
                rope_type: None,
                rope_theta: None,
            });
            if let Some(kind) = local.rope_type.filter(|k| k != "default") {
                bail!("field `rope_parameters.sliding_attention.rope_type`: `{kind}` is not supported for the sliding layers (only default)");
            }
            raw["rope_parameters"] = per.full_attention;
            local.rope_theta.unwrap_or(10_000.0)
        } else {
            typed::<Fields>(&raw)?
                .rope_local_base_freq
                .unwrap_or(10_000.0)
        };
        let defaults = Defaults {
            rope_theta: 1_000_000.0,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            sliding_window_pattern: 6,
            shape: &SHAPE,
        };
        let mut c = gemma::parse(&raw, self.model_type(), &defaults)?;
        c.qk_norm = true;
        c.local_rope_theta = Some(local_theta);
        Ok(c)
    }
    fn new_config_fields(&self, _layers: usize) -> Option<Value> {
        Some(json!({
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 64,
            "attn_logit_softcapping": null,
            "final_logit_softcapping": null,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "rope_theta": 1_000_000.0,
            "rope_local_base_freq": 10_000.0,
            "rope_scaling": null,
            "attention_bias": false,
            "cache_implementation": "hybrid",
        }))
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}
