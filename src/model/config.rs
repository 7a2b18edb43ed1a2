//! `config.json` → one [`ModelConfig`]: the decoder shape plus the few flags in which families differ.

use anyhow::{anyhow, bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::text_model::TextModel;

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
    /// LongRoPE (Phi-3): inverse frequencies divided by `short_factor`, or by `long_factor` once a
    /// forward pass reaches past `original_max_position_embeddings`; cos and sin scaled by
    /// `attention_factor`.
    LongRope {
        short_factor: Vec<f64>,
        long_factor: Vec<f64>,
        attention_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The activation on the MLP's gate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu`: SwiGLU.
    Silu,
    /// `gelu_pytorch_tanh`: GELU with the tanh approximation (GeGLU, Gemma).
    GeluTanh,
}

impl Activation {
    /// The activation a config.json names in `field`; absent means `silu`.
    pub fn parse(field: &str, name: Option<&str>) -> Result<Self> {
        match name.unwrap_or("silu") {
            "silu" => Ok(Activation::Silu),
            "gelu_pytorch_tanh" => Ok(Activation::GeluTanh),
            other => bail!(
                "field `{field}`: activation `{other}` is not supported (supported: silu, gelu_pytorch_tanh)"
            ),
        }
    }
}

/// Everything the shared decoder needs to know about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family's `model_type` as written in config.json (`llama`, `phi3`, `gemma2`, ...).
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
    /// The leading dimensions of each head that RoPE rotates (head_dim × partial_rotary_factor);
    /// the rest pass through unrotated.
    pub rotary_dim: usize,
    /// q/k/v stored as one `qkv_proj` and gate/up as one `gate_up_proj` (Phi-3); LoRA attaches to
    /// the fused modules, as PEFT does.
    pub fused_projections: bool,
    /// Biases on the q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down.
    pub mlp_bias: bool,
    /// RMSNorm over each head's query and key before RoPE (`q_norm`/`k_norm`, Qwen3, Gemma 3).
    pub qk_norm: bool,
    pub tie_word_embeddings: bool,
    /// Attend only to the last `sliding_window` positions (Mistral), when set.
    pub sliding_window: Option<usize>,
    /// Which layers use `sliding_window` (Gemma 2: every other one); None: all of them.
    pub sliding_layers: Option<Vec<bool>>,
    /// The MLP's activation on the gate.
    pub activation: Activation,
    /// The factor on q·kᵀ: 1/√head_dim, or Gemma's query_pre_attn_scalar^−½.
    pub attention_scale: f64,
    /// Attention scores capped to cap·tanh(s/cap) before the mask (Gemma 2), when set.
    pub attn_logit_softcapping: Option<f64>,
    /// Logits capped to cap·tanh(l/cap) (Gemma 2), when set.
    pub final_logit_softcapping: Option<f64>,
    /// RMSNorm gains stored as w and applied as (1 + w) (Gemma).
    pub norm_gain_offset: bool,
    /// Norms on the attention and MLP outputs too (Gemma 2: `post_attention_layernorm` on the
    /// attention output, `pre_feedforward_layernorm` and `post_feedforward_layernorm` around the MLP).
    pub sandwich_norms: bool,
    /// Token embeddings multiplied by √hidden_size (Gemma).
    pub scale_embeddings: bool,
    /// The RoPE base of the sliding-window layers, unscaled (Gemma 3's `rope_local_base_freq`);
    /// None: all layers use `rope_theta` and `rope_scaling`.
    pub local_rope_theta: Option<f64>,
    /// The dtype the weights are stored in (`float32`, `bfloat16`, `float16`), if config.json says.
    pub torch_dtype: Option<String>,
    /// Where the decoder sits among the checkpoint's modules: alone, or as the language model of a
    /// multimodal checkpoint.
    pub text_model: TextModel,
}

impl ModelConfig {
    /// Checks what every family's config must satisfy.
    pub(crate) fn validate(&self) -> Result<()> {
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
        if !self.rotary_dim.is_multiple_of(2)
            || self.rotary_dim == 0
            || self.rotary_dim > self.head_dim
        {
            bail!(
                "the rotary part of each head ({} of head_dim {}) must be even and positive: check head_dim and partial_rotary_factor",
                self.rotary_dim,
                self.head_dim
            );
        }
        if let Some(layers) = &self.sliding_layers {
            if layers.len() != self.num_hidden_layers {
                bail!(
                    "field `layer_types` names {} layers, but num_hidden_layers is {}: give one entry per layer",
                    layers.len(),
                    self.num_hidden_layers
                );
            }
        }
        if let RopeScaling::LongRope {
            short_factor,
            long_factor,
            ..
        } = &self.rope_scaling
        {
            let half = self.rotary_dim / 2;
            if short_factor.len() != half || long_factor.len() != half {
                bail!(
                    "longrope fields `short_factor` and `long_factor` need {half} entries each (half of head_dim × partial_rotary_factor), not {} and {}: check them against head_dim and partial_rotary_factor",
                    short_factor.len(),
                    long_factor.len()
                );
            }
        }
        Ok(())
    }
}

/// Deserializes the fields `T` names from config.json (or another parsed JSON file): absent and
/// `null` optional fields are None, and a field of the wrong type is an error that names it.
pub fn typed<T: DeserializeOwned>(raw: &Value) -> Result<T> {
    serde_path_to_error::deserialize(raw).map_err(|e| match e.path().to_string() {
        // A missing required field: serde's message names it.
        root if root == "." => anyhow!("{}", e.inner()),
        path => anyhow!("field `{path}`: {}", e.inner()),
    })
}

/// The fields every Llama-like config.json carries, typed as transformers types them.
#[derive(Deserialize)]
struct CommonFields {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    /// Phi-3: the context the model was pre-trained with (LongRoPE switches factors past it).
    original_max_position_embeddings: Option<usize>,
    partial_rotary_factor: Option<f64>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    /// transformers < 5.
    rope_scaling: Option<RopeFields>,
    /// transformers >= 5: rope_theta and the scaling in one object.
    rope_parameters: Option<RopeFields>,
    tie_word_embeddings: Option<bool>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
}

/// `rope_scaling` or `rope_parameters`.
#[derive(Deserialize)]
struct RopeFields {
    rope_type: Option<String>,
    /// The older name of `rope_type`.
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    rope_theta: Option<f64>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
    short_factor: Option<Vec<f64>>,
    long_factor: Option<Vec<f64>>,
    attention_factor: Option<f64>,
    /// transformers >= 5 may keep partial_rotary_factor here.
    partial_rotary_factor: Option<f64>,
}

/// Refuses dropout inside the base model (config field `name` = `p`): only LoRA trains, with its
/// own dropout.
pub fn refuse_dropout(name: &str, p: Option<f64>) -> Result<()> {
    if p.unwrap_or(0.0) != 0.0 {
        bail!("field `{name}`: dropout inside the base model is not supported; set it to 0.0 (LoRA has its own dropout)");
    }
    Ok(())
}

/// Fields every Llama-like config.json carries; families add their own flags on top. Absent fields
/// take transformers' defaults for these families.
pub fn parse_common(raw: &Value, model_type: &str) -> Result<ModelConfig> {
    let f: CommonFields = typed(raw)?;
    let (hidden_size, num_attention_heads) = (f.hidden_size, f.num_attention_heads);
    let divisible = num_attention_heads > 0 && hidden_size.is_multiple_of(num_attention_heads);
    let head_dim = match f.head_dim {
        Some(d) => d,
        None if divisible => hidden_size / num_attention_heads,
        None => bail!("hidden_size ({hidden_size}) is not divisible by num_attention_heads ({num_attention_heads}) and no head_dim is given"),
    };
    let activation = Activation::parse("hidden_act", f.hidden_act.as_deref())?;
    let rope_theta = f
        .rope_theta
        .or_else(|| f.rope_parameters.as_ref().and_then(|p| p.rope_theta))
        .unwrap_or(10_000.0);
    let (scaling_field, scaling) = match (&f.rope_scaling, &f.rope_parameters) {
        (Some(s), _) => ("rope_scaling", Some(s)),
        (None, p) => ("rope_parameters", p.as_ref()),
    };
    let partial = f
        .partial_rotary_factor
        .or_else(|| {
            f.rope_parameters
                .as_ref()
                .and_then(|p| p.partial_rotary_factor)
        })
        .unwrap_or(1.0);
    if !(partial > 0.0 && partial <= 1.0) {
        bail!("field `partial_rotary_factor`: {partial} is not in (0, 1]; it is the share of each head that RoPE rotates (1.0 for most models, 0.75 for Phi-4-mini)");
    }
    // transformers: int(head_dim * partial_rotary_factor).
    let rotary_dim = (head_dim as f64 * partial) as usize;
    let max_position_embeddings = f.max_position_embeddings.unwrap_or(2048);
    let positions = Positions {
        max: max_position_embeddings,
        original: f.original_max_position_embeddings,
    };
    Ok(ModelConfig {
        model_type: model_type.to_string(),
        vocab_size: f.vocab_size,
        hidden_size,
        intermediate_size: f.intermediate_size,
        num_hidden_layers: f.num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: f.num_key_value_heads.unwrap_or(num_attention_heads),
        head_dim,
        max_position_embeddings,
        rms_norm_eps: f.rms_norm_eps.unwrap_or(1e-6),
        rope_theta,
        rope_scaling: rope_scaling(scaling_field, scaling, positions)?,
        rotary_dim,
        fused_projections: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        qk_norm: false,
        tie_word_embeddings: f.tie_word_embeddings.unwrap_or(false),
        sliding_window: None,
        sliding_layers: None,
        activation,
        attention_scale: 1.0 / (head_dim as f64).sqrt(),
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        norm_gain_offset: false,
        sandwich_norms: false,
        scale_embeddings: false,
        local_rope_theta: None,
        torch_dtype: f.torch_dtype.or(f.dtype),
        text_model: TextModel::CAUSAL_LM,
    })
}

/// The context lengths a config names: `max_position_embeddings` and, at the top level,
/// `original_max_position_embeddings` (Phi-3).
#[derive(Clone, Copy)]
struct Positions {
    max: usize,
    original: Option<usize>,
}

fn rope_scaling(field: &str, v: Option<&RopeFields>, positions: Positions) -> Result<RopeScaling> {
    let Some(v) = v else {
        return Ok(RopeScaling::None);
    };
    let kind = v
        .rope_type
        .as_deref()
        .or(v.legacy_type.as_deref())
        .unwrap_or("default");
    let num = |value: Option<f64>, key: &str| -> Result<f64> {
        value.with_context(|| format!("{field} of type `{kind}` needs a number `{key}`"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num(v.factor, "factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num(v.factor, "factor")?,
            low_freq_factor: num(v.low_freq_factor, "low_freq_factor")?,
            high_freq_factor: num(v.high_freq_factor, "high_freq_factor")?,
            original_max_position_embeddings: num(
                v.original_max_position_embeddings,
                "original_max_position_embeddings",
            )?,
        }),
        // Phi-3's older names of longrope.
        "longrope" | "su" => longrope(field, v, positions),
        other => {
            bail!("{field} type `{other}` is not supported (supported: default, linear, llama3, longrope)")
        }
    }
}

/// LongRoPE as transformers computes it: the attention factor, unless given, is
/// √(1 + ln f / ln original) for the extension factor f = max / original positions (4.x; 5.x
/// prefers an explicit `factor` in rope_parameters), 1 when f ≤ 1.
fn longrope(field: &str, v: &RopeFields, positions: Positions) -> Result<RopeScaling> {
    let factors = |value: &Option<Vec<f64>>, key: &str| -> Result<Vec<f64>> {
        value
            .clone()
            .with_context(|| format!("{field} of type `longrope` needs a list of numbers `{key}`"))
    };
    let given_original = positions
        .original
        .or(v.original_max_position_embeddings.map(|o| o as usize));
    let original = given_original.unwrap_or(positions.max);
    let ratio = positions.max as f64 / original as f64;
    let factor = match (field, v.factor, given_original) {
        ("rope_parameters", Some(f), _) => f,
        (_, _, Some(_)) => ratio,
        (_, f, None) => f.unwrap_or(ratio),
    };
    let attention_factor = match v.attention_factor {
        Some(a) => a,
        None if factor <= 1.0 => 1.0,
        None => (1.0 + factor.ln() / (original as f64).ln()).sqrt(),
    };
    Ok(RopeScaling::LongRope {
        short_factor: factors(&v.short_factor, "short_factor")?,
        long_factor: factors(&v.long_factor, "long_factor")?,
        attention_factor,
        original_max_position_embeddings: original,
    })
}
