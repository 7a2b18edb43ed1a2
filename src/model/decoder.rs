//! The shared decoder of all supported families: RMSNorm, RoPE, grouped-query attention, SwiGLU.
//! Written with differentiable candle ops only, so LoRA gradients flow through every layer.

use anyhow::Result;
use candle_core::{DType, Device, Tensor, D};

use super::checkpoint;
use super::config::ModelConfig;
use super::cross_entropy;
use super::frozen_weight::FrozenWeight;
use super::kv_cache::{KvCache, LayerKv};
use super::linear::{frozen_matmul, Linear};
use super::lora::Pass;
use super::matmul::matmul_wide;
use super::phases::{timed, Phase};
use super::rms_norm;
use super::rope::{self, Rope};
use super::sdpa;
use super::swiglu;
use super::weights::Weights;

/// Where each token sits: its position id and the sample it belongs to (packed rows hold several).
#[derive(Debug, Clone)]
pub struct TokenLayout {
    pub batch: usize,
    pub seq: usize,
    /// [batch * seq] position ids, restarting at 0 for each sample.
    pub position_ids: Vec<u32>,
    /// [batch * seq] sample ids; attention never crosses from one sample to another.
    pub segment_ids: Vec<u32>,
}

impl TokenLayout {
    /// One sample per row, positions 0..seq.
    pub fn causal(batch: usize, seq: usize) -> Self {
        let position_ids = (0..batch).flat_map(|_| 0..seq as u32).collect();
        Self {
            batch,
            seq,
            position_ids,
            segment_ids: vec![0; batch * seq],
        }
    }

    /// The additive attention mask [batch, 1, seq, seq] (f32): causal, within a sample, inside the window.
    fn mask(&self, sliding_window: Option<usize>, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.batch, self.seq);
        let mut mask = vec![0f32; b * t * t];
        for row in 0..b {
            let seg = &self.segment_ids[row * t..(row + 1) * t];
            for i in 0..t {
                for j in 0..t {
                    let visible =
                        j <= i && seg[i] == seg[j] && sliding_window.is_none_or(|w| i - j < w);
                    if !visible {
                        mask[(row * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(mask, (b, 1, t, t), device)?)
    }
}

/// Per-forward tensors shared by all layers.
#[derive(Clone)]
pub(crate) struct Context {
    /// Rows and positions of the batch; activations between layers are [batch·seq, hidden].
    batch: usize,
    seq: usize,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    pub(crate) pass: Pass,
}

/// The dtype reductions (norms, softmax, logits) run in: f32, or f64 for an f64 model.
pub fn accumulation_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// Root-mean-square layer norm, computed in f32 as transformers does.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if rms_norm::supports(x) && x.dtype() == self.weight.dtype() {
            return Ok(rms_norm::rms_norm(x, &self.weight, self.eps)?);
        }
        let dtype = x.dtype();
        let x32 = x.to_dtype(accumulation_dtype(dtype))?;
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x32.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        Ok(normed.to_dtype(dtype)?.broadcast_mul(&self.weight)?)
    }
}

/// A projection's rows [tokens, heads·head_dim], each head normalised on its own, when `norm` is set.
fn head_norm(norm: Option<&RmsNorm>, y: Tensor, head_dim: usize) -> Result<Tensor> {
    let Some(norm) = norm else {
        return Ok(y);
    };
    let (rows, width) = y.dims2()?;
    let heads = norm.forward(&y.reshape((rows * width / head_dim, head_dim))?)?;
    Ok(heads.reshape((rows, width))?)
}

#[derive(Clone)]
pub struct Attention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    /// Attention over `x` [batch, seq, hidden]; with `past`, the new tokens also attend to the
    /// cached keys and values, and their own are appended to the cache.
    fn forward(&self, x: &Tensor, ctx: &Context, past: Option<&mut LayerKv>) -> Result<Tensor> {
        let (b, t) = (ctx.batch, ctx.seq);
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let (cos, sin) = (&ctx.cos, &ctx.sin);
        let q = head_norm(self.q_norm.as_ref(), self.q_proj.forward(x, ctx.pass)?, d)?;
        let q = rope::split_heads_rotated(&q, (b, t, h), cos, sin)?;
        let k = head_norm(self.k_norm.as_ref(), self.k_proj.forward(x, ctx.pass)?, d)?;
        let k = rope::split_heads_rotated(&k, (b, t, kvh), cos, sin)?;
        let v = self
            .v_proj
            .forward(x, ctx.pass)?
            .reshape((b, t, kvh, d))?
            .transpose(1, 2)?
            .contiguous()?;
        // Grouped-query attention without copying K/V: the query heads that share a K/V head
        // are stacked along the rows.
        let q = q.reshape((b, kvh, (h / kvh) * t, d))?;
        let out = match past {
            Some(past) if !past.is_empty() => {
                let (k, v) = past.append(&k, &v)?;
                sdpa::attention_after_past(&q, &k, &v, &ctx.mask)?
            }
            first => {
                if let Some(past) = first {
                    past.append(&k, &v)?;
                }
                sdpa::attention(&q, &k, &v, &ctx.mask, sdpa::block_rows(b, h, t))?
            }
        };
        let out = out
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b * t, h * d))?;
        self.o_proj.forward(&out, ctx.pass)
    }
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, pass)?;
        let up = self.up_proj.forward(x, pass)?;
        self.down_proj.forward(&swiglu::silu_mul(&gate, &up)?, pass)
    }
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Mlp,
}

impl DecoderLayer {
    /// The layer's seven projections, in the order of [`MODULE_PATHS`].
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }

    pub(crate) fn forward(&self, x: &Tensor, ctx: &Context) -> Result<Tensor> {
        self.forward_with_past(x, ctx, None)
    }

    fn forward_with_past(
        &self,
        x: &Tensor,
        ctx: &Context,
        past: Option<&mut LayerKv>,
    ) -> Result<Tensor> {
        let h = (x + self
            .self_attn
            .forward(&self.input_layernorm.forward(x)?, ctx, past)?)?;
        let out = (&h
            + self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&h)?, ctx.pass)?)?;
        Ok(out)
    }
}

/// A decoder-only causal language model with an LM head.
pub struct CausalLm {
    pub config: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// The LM head W [vocab, hidden]: `lm_head.weight`, or the embeddings when tied.
    pub head: FrozenWeight,
    /// Recompute each layer's activations in the backward pass instead of keeping them.
    pub gradient_checkpointing: bool,
    /// Adapter gradients computed inside checkpointed layers' backward passes.
    checkpoint_grads: checkpoint::SideGrads,
    /// The dtype activations run in: the weights' own, except on the CPU, where bf16/f16 weights
    /// are multiplied in f32 anyway and element-wise work in f32 needs no conversions.
    activations: DType,
    rope: Rope,
    device: Device,
}

impl CausalLm {
    /// Builds the model from checkpoint tensors with transformers' names.
    pub fn load(config: ModelConfig, weights: &Weights, device: &Device) -> Result<Self> {
        let c = &config;
        let embed_tokens =
            weights.get("model.embed_tokens.weight", &[c.vocab_size, c.hidden_size])?;
        let activations = match embed_tokens.dtype() {
            DType::BF16 | DType::F16 if device.is_cpu() => DType::F32,
            dtype => dtype,
        };
        let (hid, inter) = (c.hidden_size, c.intermediate_size);
        let (qd, kvd) = (
            c.num_attention_heads * c.head_dim,
            c.num_key_value_heads * c.head_dim,
        );
        let linear = |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let w = weights.get(&format!("{name}.weight"), &[out, inp])?;
            let b = if bias {
                Some(
                    weights
                        .get(&format!("{name}.bias"), &[out])?
                        .to_dtype(activations)?,
                )
            } else {
                None
            };
            Ok(Linear::new(w, b))
        };
        let norm_of = |name: &str, width: usize| -> Result<RmsNorm> {
            Ok(RmsNorm {
                weight: weights
                    .get(&format!("{name}.weight"), &[width])?
                    .to_dtype(activations)?,
                eps: c.rms_norm_eps,
            })
        };
        let norm = |name: &str| norm_of(name, hid);
        let head_norm = |name: String| c.qk_norm.then(|| norm_of(&name, c.head_dim)).transpose();
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                input_layernorm: norm(&format!("{p}.input_layernorm"))?,
                self_attn: Attention {
                    q_proj: linear(&format!("{p}.self_attn.q_proj"), qd, hid, c.qkv_bias)?,
                    k_proj: linear(&format!("{p}.self_attn.k_proj"), kvd, hid, c.qkv_bias)?,
                    v_proj: linear(&format!("{p}.self_attn.v_proj"), kvd, hid, c.qkv_bias)?,
                    o_proj: linear(&format!("{p}.self_attn.o_proj"), hid, qd, c.o_bias)?,
                    q_norm: head_norm(format!("{p}.self_attn.q_norm"))?,
                    k_norm: head_norm(format!("{p}.self_attn.k_norm"))?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                },
                post_attention_layernorm: norm(&format!("{p}.post_attention_layernorm"))?,
                mlp: Mlp {
                    gate_proj: linear(&format!("{p}.mlp.gate_proj"), inter, hid, c.mlp_bias)?,
                    up_proj: linear(&format!("{p}.mlp.up_proj"), inter, hid, c.mlp_bias)?,
                    down_proj: linear(&format!("{p}.mlp.down_proj"), hid, inter, c.mlp_bias)?,
                },
            });
        }
        let head = FrozenWeight::new(if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            weights.get("lm_head.weight", &[c.vocab_size, hid])?
        });
        Ok(Self {
            rope: Rope::new(c),
            norm: norm("model.norm")?,
            embed_tokens,
            layers,
            head,
            gradient_checkpointing: false,
            checkpoint_grads: Default::default(),
            activations,
            device: device.clone(),
            config,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the base weights.
    pub fn dtype(&self) -> DType {
        self.embed_tokens.dtype()
    }

    /// Final hidden states [batch, seq, hidden] for token ids [batch, seq].
    pub fn hidden_states(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        step: Option<u64>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let mask = layout.mask(self.config.sliding_window, &self.device)?;
        let ctx = self.context(&layout.position_ids, (b, t), mask, Pass::new(step))?;
        let mut x = self.embed(input_ids)?;
        let checkpointing = self.gradient_checkpointing && step.is_some();
        for layer in &self.layers {
            x = if checkpointing {
                checkpoint::forward(layer, &x, &ctx, &self.checkpoint_grads)?
            } else {
                layer.forward(&x, &ctx)?
            };
        }
        Ok(self
            .norm
            .forward(&x)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Final hidden states [batch, seq, hidden] of new tokens [batch, seq] that follow what `cache`
    /// holds (nothing at first), without gradients. Row r's first `real[r]` tokens are real, the
    /// rest right padding; the new keys and values are appended to the cache.
    pub fn hidden_states_cached(
        &self,
        input_ids: &Tensor,
        real: &[usize],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let step = cache.extend(real, t, self.config.sliding_window)?;
        let mask = Tensor::from_vec(step.mask, (b, 1, t, cache.len()), &self.device)?;
        let ctx = self.context(&step.position_ids, (b, t), mask, Pass::new(None))?;
        let mut x = self.embed(input_ids)?;
        for (layer, past) in self.layers.iter().zip(cache.layers_mut()) {
            x = layer.forward_with_past(&x, &ctx, Some(past))?;
        }
        Ok(self
            .norm
            .forward(&x)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// An empty cache for `batch` rows with room for `capacity` positions before it grows.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> KvCache {
        KvCache::new(self.layers.len(), batch, capacity)
    }

    /// The per-forward tables: RoPE at the given positions, the mask in the accumulation dtype.
    fn context(
        &self,
        position_ids: &[u32],
        (b, t): (usize, usize),
        mask: Tensor,
        pass: Pass,
    ) -> Result<Context> {
        let (cos, sin) = self.rope.tables(position_ids, b, t, &self.device)?;
        Ok(Context {
            batch: b,
            seq: t,
            cos,
            sin,
            mask: mask.to_dtype(accumulation_dtype(self.dtype()))?,
            pass,
        })
    }

    /// Token embeddings [batch·seq, hidden] of ids [batch, seq]: the layers work on rows, so
    /// that no reshape (each a copy in candle's backward) sits between their ops.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        Ok(self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .to_dtype(self.activations)?)
    }

    /// The adapter gradients that checkpointed layers computed since the last call, by variable.
    pub fn take_checkpoint_grads(
        &self,
    ) -> std::collections::HashMap<candle_core::TensorId, Tensor> {
        checkpoint::take(&self.checkpoint_grads)
    }

    /// Logits [n, vocab] (f32, or f64 for an f64 model) for hidden states [n, hidden].
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        if hidden.track_op() {
            return Ok(
                frozen_matmul(hidden, &self.head)?.to_dtype(accumulation_dtype(self.dtype()))?
            );
        }
        let head = self.head.tensor();
        let flops = 2 * hidden.elem_count() * head.dim(0)?;
        Ok(timed(Phase::LmHead, flops, || {
            match self.head.transposed_product_f32(hidden)? {
                Some(logits) => {
                    Tensor::from_vec(logits, (hidden.dim(0)?, head.dim(0)?), hidden.device())
                }
                None => matmul_wide(hidden, &head.t()?),
            }
        })?)
    }

    /// −log p(target) [n] (f32, or f64 for an f64 model) for hidden states [n, hidden] and target
    /// ids [n]; the logits exist one block of rows at a time.
    pub fn target_nll(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let block = cross_entropy::block_rows(hidden.dim(0)?, self.config.vocab_size);
        Ok(cross_entropy::head_nll(hidden, &self.head, targets, block)?)
    }

    /// Logits [batch, seq, vocab] in the accumulation dtype (f32 unless the model is f64).
    pub fn forward(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        step: Option<u64>,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.hidden_states(input_ids, layout, step)?;
        let logits = self.logits(&h.reshape((b * t, self.config.hidden_size))?)?;
        Ok(logits.reshape((b, t, self.config.vocab_size))?)
    }

    /// Every linear layer with its full module name (`model.layers.0.self_attn.q_proj`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let all = l.projections();
            out.extend(
                all.into_iter()
                    .zip(MODULE_PATHS)
                    .map(|(lin, p)| (format!("model.layers.{i}.{p}"), lin)),
            );
        }
        out
    }

    /// Every linear layer with its full module name, mutable (to attach or replace adapters).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut l.self_attn, &mut l.mlp);
            let all = [
                &mut a.q_proj,
                &mut a.k_proj,
                &mut a.v_proj,
                &mut a.o_proj,
                &mut m.gate_proj,
                &mut m.up_proj,
                &mut m.down_proj,
            ];
            out.extend(
                all.into_iter()
                    .zip(MODULE_PATHS)
                    .map(|(lin, p)| (format!("model.layers.{i}.{p}"), lin)),
            );
        }
        out
    }
}

/// Paths of a layer's projections below `model.layers.N`, in the order [`CausalLm::linears`] lists them.
const MODULE_PATHS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];
