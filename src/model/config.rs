//! `config.json` → one [`ModelConfig`]: the decoder shape plus the few flags in which families differ.

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::path::Path;

use super::families;

/// How rotary position frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.x frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Everything the shared decoder needs to know about a checkpoint.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The family's `model_type` as written in config.json (`llama`, `mistral`, `qwen2`).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub max_position_embeddings: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down.
    pub mlp_bias: bool,
    pub tie_word_embeddings: bool,
    /// Attend only to the last `sliding_window` positions (Mistral), when set.
    pub sliding_window: Option<usize>,
    /// The dtype the weights are stored in (`float32`, `bfloat16`, `float16`), if config.json says.
    pub torch_dtype: Option<String>,
}

impl ModelConfig {
    /// Reads and validates `config.json`; `path` is only used in error messages.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read model config {}", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        Self::from_json(&raw).with_context(|| format!("in model config {}", path.display()))
    }

    /// Builds the config from parsed config.json, dispatching on `model_type`.
    pub fn from_json(raw: &Value) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .context("field `model_type` is missing")?;
        let family = families::by_model_type(model_type)?;
        let config = family.parse(raw)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            bail!("num_attention_heads and num_key_value_heads must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            bail!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads,
                self.num_key_value_heads
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            bail!(
                "head_dim ({}) must be even for rotary embeddings",
                self.head_dim
            );
        }
        Ok(())
    }

    /// Parameter count of the base model (tied embeddings counted once).
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 };
        let mlp = 3 * h * i + if self.mlp_bias { 2 * i + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + self.num_hidden_layers * layer + h + head
    }
}

/// Fields every Llama-like config.json carries; families add their own flags on top.
pub fn parse_common(raw: &Value, model_type: &str) -> Result<ModelConfig> {
    let hidden_size = req_usize(raw, "hidden_size")?;
    let num_attention_heads = req_usize(raw, "num_attention_heads")?;
    let num_key_value_heads = opt_usize(raw, "num_key_value_heads")?.unwrap_or(num_attention_heads);
    let divisible = num_attention_heads > 0 && hidden_size.is_multiple_of(num_attention_heads);
    if !divisible && opt_usize(raw, "head_dim")?.is_none() {
        bail!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given");
    }
    let head_dim = match opt_usize(raw, "head_dim")? {
        Some(d) => d,
        None => hidden_size / num_attention_heads,
    };
    if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
        if act != "silu" {
            bail!("hidden_act `{act}` is not supported (only `silu`)");
        }
    }
    // transformers >= 5 keeps rope settings in `rope_parameters`; older versions in rope_theta/rope_scaling.
    let rope_parameters = raw.get("rope_parameters").filter(|v| v.is_object());
    let rope_theta = match raw.get("rope_theta").and_then(Value::as_f64) {
        Some(t) => t,
        None => rope_parameters
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
            .unwrap_or(10_000.0),
    };
    let scaling = raw
        .get("rope_scaling")
        .filter(|v| v.is_object())
        .or(rope_parameters);
    Ok(ModelConfig {
        model_type: model_type.to_string(),
        vocab_size: req_usize(raw, "vocab_size")?,
        hidden_size,
        intermediate_size: req_usize(raw, "intermediate_size")?,
        num_hidden_layers: req_usize(raw, "num_hidden_layers")?,
        num_attention_heads,
        num_key_value_heads,
        head_dim,
        max_position_embeddings: opt_usize(raw, "max_position_embeddings")?.unwrap_or(2048),
        rms_norm_eps: raw
            .get("rms_norm_eps")
            .and_then(Value::as_f64)
            .unwrap_or(1e-6),
        rope_theta,
        rope_scaling: parse_rope_scaling(scaling)?,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        tie_word_embeddings: raw
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        sliding_window: None,
        torch_dtype: raw
            .get("torch_dtype")
            .or_else(|| raw.get("dtype"))
            .and_then(Value::as_str)
            .map(str::to_string),
    })
}

fn parse_rope_scaling(v: Option<&Value>) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        v.get(key)
            .and_then(Value::as_f64)
            .with_context(|| format!("rope_scaling of type `{kind}` needs a number `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => bail!(
            "rope_scaling type `{other}` is not supported (supported: default, linear, llama3)"
        ),
    }
}

/// A required non-negative integer field.
pub fn req_usize(raw: &Value, key: &str) -> Result<usize> {
    opt_usize(raw, key)?.with_context(|| format!("field `{key}` is missing"))
}

/// An optional non-negative integer field (`null` counts as absent).
pub fn opt_usize(raw: &Value, key: &str) -> Result<Option<usize>> {
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|n| Some(n as usize))
            .with_context(|| format!("field `{key}` must be a non-negative integer, found {v}")),
    }
}
