//! Gemma 2: the Llama decoder with GeGLU (`gelu_pytorch_tanh`), RMSNorm gains applied as (1 + w),
//! four norms per layer, embeddings scaled by √hidden, attention scaled by
//! `query_pre_attn_scalar`^−½, tanh soft-capping of attention scores and of the logits, and a
//! sliding window on every other layer (`layer_types`).

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use super::Family;
use crate::model::config::{parse_common, typed, Activation, ModelConfig};

/// Gemma 2's own fields of config.json.
#[derive(Deserialize)]
struct Fields {
    hidden_activation: Option<String>,
    query_pre_attn_scalar: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    attention_bias: Option<bool>,
    tie_word_embeddings: Option<bool>,
    attention_dropout: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

pub struct Gemma2;

impl Family for Gemma2 {
    fn model_type(&self) -> &'static str {
        "gemma2"
    }
    fn architecture(&self) -> &'static str {
        "Gemma2ForCausalLM"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut c = parse_common(raw, self.model_type())?;
        let f: Fields = typed(raw)?;
        if f.attention_dropout.unwrap_or(0.0) != 0.0 {
            bail!("field `attention_dropout`: dropout inside the base model is not supported; set it to 0.0 (LoRA has its own dropout)");
        }
        if f.use_bidirectional_attention.unwrap_or(false) {
            bail!("field `use_bidirectional_attention`: bidirectional (encoder) attention is not supported; Feinschliff trains causal language models");
        }
        // transformers' Gemma 2 reads hidden_activation; hidden_act is a leftover it ignores.
        c.activation = Activation::parse(
            "hidden_activation",
            Some(
                f.hidden_activation
                    .as_deref()
                    .unwrap_or("gelu_pytorch_tanh"),
            ),
        )?;
        c.attention_scale = 1.0 / f.query_pre_attn_scalar.unwrap_or(256.0).sqrt();
        c.attn_logit_softcapping = f.attn_logit_softcapping;
        c.final_logit_softcapping = f.final_logit_softcapping;
        c.qkv_bias = f.attention_bias.unwrap_or(false);
        c.o_bias = c.qkv_bias;
        c.tie_word_embeddings = f.tie_word_embeddings.unwrap_or(true);
        c.norm_gain_offset = true;
        c.sandwich_norms = true;
        c.scale_embeddings = true;
        c.sliding_window = f.sliding_window;
        c.sliding_layers = Some(sliding_layers(f.layer_types, c.num_hidden_layers)?);
        Ok(c)
    }
    fn new_config_fields(&self, _layers: usize) -> Value {
        json!({
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "query_pre_attn_scalar": 64,
            "attn_logit_softcapping": 50.0,
            "final_logit_softcapping": 30.0,
            "sliding_window": 4096,
            "attention_bias": false,
            "cache_implementation": "hybrid",
        })
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}

/// Which layers slide: `layer_types` when given (transformers ≥ 4.53 writes it), else Gemma 2's
/// pattern (layers 0, 2, 4, … slide).
fn sliding_layers(layer_types: Option<Vec<String>>, layers: usize) -> Result<Vec<bool>> {
    let Some(types) = layer_types else {
        return Ok((0..layers).map(|i| i % 2 == 0).collect());
    };
    types
        .iter()
        .enumerate()
        .map(|(i, t)| match t.as_str() {
            "sliding_attention" => Ok(true),
            "full_attention" => Ok(false),
            other => bail!("field `layer_types[{i}]`: `{other}` is not a layer type (sliding_attention, full_attention)"),
        })
        .collect()
}
