//! The tensors of one decoder layer as a family stores them: each projection's role, Hugging Face
//! name, shape and bias (q/k/v and gate/up separate, or fused); each norm's name and width. The
//! decoder, `model new` and the parameter count read this one description.

use super::config::ModelConfig;

/// What a projection computes; fused roles hold several outputs stacked along the rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Q,
    K,
    V,
    /// q, k and v in one matrix, in that order (Phi-3's `qkv_proj`).
    Qkv,
    O,
    Gate,
    Up,
    /// gate and up in one matrix, gate first (Phi-3's `gate_up_proj`).
    GateUp,
    Down,
}

impl Role {
    /// The module path below `model.layers.N`.
    pub fn path(self) -> &'static str {
        match self {
            Role::Q => "self_attn.q_proj",
            Role::K => "self_attn.k_proj",
            Role::V => "self_attn.v_proj",
            Role::Qkv => "self_attn.qkv_proj",
            Role::O => "self_attn.o_proj",
            Role::Gate => "mlp.gate_proj",
            Role::Up => "mlp.up_proj",
            Role::GateUp => "mlp.gate_up_proj",
            Role::Down => "mlp.down_proj",
        }
    }
}

/// One linear layer of a decoder layer: weight [out, inp], and a bias [out] when `bias`.
#[derive(Debug, Clone, Copy)]
pub struct Projection {
    pub role: Role,
    pub out: usize,
    pub inp: usize,
    pub bias: bool,
}

/// One RMSNorm gain of a decoder layer.
#[derive(Debug, Clone, Copy)]
pub struct Norm {
    /// The module path below `model.layers.N`.
    pub path: &'static str,
    pub width: usize,
}

/// Parameter count of the base model (tied embeddings counted once).
pub fn parameter_count(c: &ModelConfig) -> usize {
    let (h, v) = (c.hidden_size, c.vocab_size);
    let projections: usize = projections(c)
        .iter()
        .map(|p| p.out * p.inp + if p.bias { p.out } else { 0 })
        .sum();
    let norms: usize = norms(c).iter().map(|n| n.width).sum();
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    v * h + c.num_hidden_layers * (projections + norms) + h + head
}

/// A layer's projections, in checkpoint order.
pub fn projections(c: &ModelConfig) -> Vec<Projection> {
    let (h, i) = (c.hidden_size, c.intermediate_size);
    let q = c.num_attention_heads * c.head_dim;
    let kv = c.num_key_value_heads * c.head_dim;
    let p = |role, out, inp, bias| Projection {
        role,
        out,
        inp,
        bias,
    };
    let mut out = if c.fused_projections {
        vec![p(Role::Qkv, q + 2 * kv, h, c.qkv_bias)]
    } else {
        vec![
            p(Role::Q, q, h, c.qkv_bias),
            p(Role::K, kv, h, c.qkv_bias),
            p(Role::V, kv, h, c.qkv_bias),
        ]
    };
    out.push(p(Role::O, h, q, c.o_bias));
    if c.fused_projections {
        out.push(p(Role::GateUp, 2 * i, h, c.mlp_bias));
    } else {
        out.push(p(Role::Gate, i, h, c.mlp_bias));
        out.push(p(Role::Up, i, h, c.mlp_bias));
    }
    out.push(p(Role::Down, h, i, c.mlp_bias));
    out
}

/// A layer's norms: before attention and MLP (and after them, for sandwich norms), and per head
/// on q and k when the family has them.
pub fn norms(c: &ModelConfig) -> Vec<Norm> {
    let h = c.hidden_size;
    let mut out = vec![
        Norm {
            path: "input_layernorm",
            width: h,
        },
        Norm {
            path: "post_attention_layernorm",
            width: h,
        },
    ];
    if c.sandwich_norms {
        for path in ["pre_feedforward_layernorm", "post_feedforward_layernorm"] {
            out.push(Norm { path, width: h });
        }
    }
    if c.qk_norm {
        for path in ["self_attn.q_norm", "self_attn.k_norm"] {
            out.push(Norm {
                path,
                width: c.head_dim,
            });
        }
    }
    out
}
