//! What Gemma 2 and Gemma 3 share: GeGLU (`gelu_pytorch_tanh`), RMSNorm gains applied as (1 + w),
//! four norms per layer, embeddings scaled by √hidden, attention scaled by
//! `query_pre_attn_scalar`^−½, optional tanh soft-capping of attention scores and logits, and
//! sliding-window layers named by `layer_types`. Absent fields take the transformers config
//! class's defaults, which differ between the two.

use anyhow::{bail, Result};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::model::config::{parse_common, refuse_dropout, typed, Activation, ModelConfig};

/// The defaults of a Gemma config class for fields config.json may leave out.
pub(super) struct Defaults {
    pub rope_theta: f64,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Every `sliding_window_pattern`-th layer attends fully; the others slide.
    pub sliding_window_pattern: usize,
    /// The shape fields (`vocab_size`, `hidden_size`, ...) and their defaults: the size the config
    /// class describes when config.json leaves them out, as Gemma 3's multimodal configs do.
    pub shape: &'static [(&'static str, usize)],
}

/// The shape fields of a Gemma config class with their defaults; Gemma 2's and Gemma 3's differ
/// in vocabulary and context only.
pub(super) const fn shape(
    vocab_size: usize,
    max_position_embeddings: usize,
) -> [(&'static str, usize); 7] {
    [
        ("vocab_size", vocab_size),
        ("hidden_size", 2304),
        ("intermediate_size", 9216),
        ("num_hidden_layers", 26),
        ("num_attention_heads", 8),
        ("num_key_value_heads", 4),
        ("max_position_embeddings", max_position_embeddings),
    ]
}

/// The Gemma fields of config.json.
#[derive(Deserialize)]
struct Fields {
    hidden_activation: String,
    query_pre_attn_scalar: f64,
    attn_logit_softcapping: Option<f64>,
    final_logit_softcapping: Option<f64>,
    sliding_window: Option<usize>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    attention_bias: Option<bool>,
    attention_dropout: Option<f64>,
    use_bidirectional_attention: Option<bool>,
}

/// Parses a Gemma config.json: the shared fields, then Gemma's.
pub(super) fn parse(raw: &Value, model_type: &str, defaults: &Defaults) -> Result<ModelConfig> {
    let raw = with_defaults(raw, defaults);
    let mut c = parse_common(&raw, model_type)?;
    let f: Fields = typed(&raw)?;
    refuse_dropout("attention_dropout", f.attention_dropout)?;
    if f.use_bidirectional_attention.unwrap_or(false) {
        bail!("field `use_bidirectional_attention`: bidirectional (encoder) attention is not supported; Feinschliff trains causal language models");
    }
    // transformers' Gemma reads hidden_activation; hidden_act is a leftover it ignores.
    c.activation = Activation::parse("hidden_activation", Some(&f.hidden_activation))?;
    c.attention_scale = 1.0 / f.query_pre_attn_scalar.sqrt();
    c.attn_logit_softcapping = f.attn_logit_softcapping;
    c.final_logit_softcapping = f.final_logit_softcapping;
    c.qkv_bias = f.attention_bias.unwrap_or(false);
    c.o_bias = c.qkv_bias;
    c.norm_gain_offset = true;
    c.sandwich_norms = true;
    c.scale_embeddings = true;
    c.sliding_window = f.sliding_window;
    let pattern = f
        .sliding_window_pattern
        .unwrap_or(defaults.sliding_window_pattern);
    c.sliding_layers = Some(sliding_layers(f.layer_types, pattern, c.num_hidden_layers)?);
    Ok(c)
}

/// config.json with the config class's defaults filled in where a field is absent (an explicit
/// `null` stays: it switches a soft cap or the window off, as in transformers).
fn with_defaults(raw: &Value, d: &Defaults) -> Value {
    let mut raw = raw.clone();
    let rope_given = raw.get("rope_theta").is_some() || raw.get("rope_parameters").is_some();
    if let Some(map) = raw.as_object_mut() {
        let mut fill = |key: &str, value: Value| {
            map.entry(key).or_insert(value);
        };
        fill("head_dim", json!(256));
        fill("hidden_activation", json!("gelu_pytorch_tanh"));
        fill("query_pre_attn_scalar", json!(256));
        fill("sliding_window", json!(4096));
        fill("attn_logit_softcapping", json!(d.attn_logit_softcapping));
        fill("final_logit_softcapping", json!(d.final_logit_softcapping));
        fill("tie_word_embeddings", json!(true));
        for (key, value) in d.shape {
            fill(key, json!(value));
        }
        if !rope_given {
            fill("rope_theta", json!(d.rope_theta));
        }
    }
    raw
}

/// Which layers slide: `layer_types` when given, else every layer but each `pattern`-th.
fn sliding_layers(
    layer_types: Option<Vec<String>>,
    pattern: usize,
    layers: usize,
) -> Result<Vec<bool>> {
    match layer_types {
        Some(types) => super::family::sliding_layers(&types),
        None => Ok((0..layers).map(|i| (i + 1) % pattern.max(1) != 0).collect()),
    }
}
