//! The shared decoder of all supported families: RMSNorm, RoPE, grouped-query attention, SwiGLU or
//! GeGLU, with what families add as configuration (fused projections, head norms, sandwich norms,
//! soft caps, per-layer windows and RoPE bases). Written with differentiable ops only, so LoRA
//! gradients flow through every layer.

use anyhow::{Context as _, Result};
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;

use super::config::{Activation, ModelConfig, RopeScaling};
use super::kernels::cross_entropy;
use super::kernels::frozen_weight::FrozenWeight;
use super::kernels::matmul::matmul_wide;
use super::kernels::phases::{timed, Phase};
use super::kernels::projection_weight::ProjectionWeight;
use super::kernels::quant::Quantization;
use super::kernels::rms_norm;
use super::kernels::sdpa::{self, Scoring};
use super::kernels::swiglu;
use super::kernels::{accumulation_dtype, checkpoint};
use super::kv_cache::{KvCache, LayerKv};
use super::layout::{self, Projection, Role};
use super::linear::{frozen_matmul, Linear};
use super::lora::Pass;
use super::rope::{self, Rope};
use super::weights::Weights;

/// A decoder layer with the context of one forward pass, recomputed in the backward pass when
/// gradient checkpointing is on.
struct CheckpointedLayer {
    layer: DecoderLayer,
    ctx: Context,
}

impl checkpoint::Recompute for CheckpointedLayer {
    fn run(&self, x: &Tensor, track: bool) -> Result<Tensor> {
        let mut ctx = self.ctx.clone();
        ctx.pass.track = track;
        self.layer.forward(x, &ctx)
    }

    fn trainable(&self) -> Vec<candle_core::Var> {
        self.layer
            .projections()
            .into_iter()
            .filter_map(|(_, l)| l.lora.as_ref())
            .flat_map(|l| [l.a.clone(), l.b.clone()])
            .collect()
    }
}

/// Where each token sits: its position id and the sample it belongs to (packed rows hold several).
#[derive(Debug, Clone)]
pub struct TokenLayout {
    pub batch: usize,
    pub seq: usize,
    /// [batch * seq] position ids, restarting at 0 for each sample (a branch's continue its
    /// parent's).
    pub position_ids: Vec<u32>,
    /// [batch * seq] sample ids; attention never crosses from one sample to another, except into
    /// a sample's ancestors.
    pub segment_ids: Vec<u32>,
    /// Per sample id, the sample it branches from, if any: a branch sees its parent's tokens (and
    /// their ancestors') before its own, as the contexts that share a prefix do when they are
    /// scored in one row. Empty: every sample stands alone.
    pub parents: Vec<Option<u32>>,
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
            parents: Vec::new(),
        }
    }

    /// Whether sample `from` sees sample `to`'s tokens: itself or one of its ancestors.
    fn sees(&self, from: u32, to: u32) -> bool {
        let mut sample = Some(from);
        while let Some(s) = sample {
            if s == to {
                return true;
            }
            sample = self.parents.get(s as usize).copied().flatten();
        }
        false
    }

    /// The additive attention mask [batch, 1, seq, seq] (f32): causal, within a sample and its
    /// ancestors, inside the window (of positions).
    fn mask(&self, sliding_window: Option<usize>, device: &Device) -> Result<Tensor> {
        let (b, t) = (self.batch, self.seq);
        let mut mask = vec![0f32; b * t * t];
        for row in 0..b {
            let seg = &self.segment_ids[row * t..(row + 1) * t];
            let pos = &self.position_ids[row * t..(row + 1) * t];
            for i in 0..t {
                for j in 0..t {
                    let visible = j <= i
                        && self.sees(seg[i], seg[j])
                        && sliding_window
                            .is_none_or(|w| (pos[i] as i64 - pos[j] as i64) < w as i64);
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
    /// The mask of layers with a sliding window, when the model has one.
    window_mask: Option<Tensor>,
    /// RoPE tables of the sliding-window layers when they have their own base (Gemma 3).
    local_tables: Option<(Tensor, Tensor)>,
    pub(crate) pass: Pass,
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

/// The query, key and value projections: three matrices, or one fused `qkv_proj` whose output
/// columns are q, k and v in that order.
#[derive(Clone)]
pub enum QkvProj {
    Separate { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

impl QkvProj {
    /// q [rows, heads·d], k and v [rows, kv_heads·d] for rows x.
    fn forward(&self, x: &Tensor, pass: Pass, q_width: usize) -> Result<[Tensor; 3]> {
        match self {
            QkvProj::Separate { q, k, v } => Ok([
                q.forward(x, pass)?,
                k.forward(x, pass)?,
                v.forward(x, pass)?,
            ]),
            QkvProj::Fused(qkv) => {
                let y = qkv.forward(x, pass)?;
                let kv_width = (y.dim(D::Minus1)? - q_width) / 2;
                Ok([
                    y.narrow(D::Minus1, 0, q_width)?,
                    y.narrow(D::Minus1, q_width, kv_width)?,
                    y.narrow(D::Minus1, q_width + kv_width, kv_width)?
                        .contiguous()?,
                ])
            }
        }
    }
}

#[derive(Clone)]
pub struct Attention {
    pub qkv: QkvProj,
    pub o_proj: Linear,
    /// Per-head RMSNorm of queries and keys before RoPE (Qwen3, Gemma 3).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scoring: Scoring,
}

impl Attention {
    /// Attention over `x` [batch, seq, hidden]; with `past`, the new tokens also attend to the
    /// cached keys and values, and their own are appended to the cache. With `rows`, only those
    /// rows of [batch·seq] go through the output projection (every row's keys and values are
    /// still computed).
    fn forward(
        &self,
        x: &Tensor,
        ctx: &Context,
        (mask, cos, sin): (&Tensor, &Tensor, &Tensor),
        past: Option<&mut LayerKv>,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (b, t) = (ctx.batch, ctx.seq);
        let (h, kvh, d) = (self.heads, self.kv_heads, self.head_dim);
        let [q, k, v] = self.qkv.forward(x, ctx.pass, h * d)?;
        let q = head_norm(self.q_norm.as_ref(), q, d)?;
        let q = rope::split_heads_rotated(&q, (b, t, h), cos, sin)?;
        let k = head_norm(self.k_norm.as_ref(), k, d)?;
        let k = rope::split_heads_rotated(&k, (b, t, kvh), cos, sin)?;
        let v = v.reshape((b, t, kvh, d))?.transpose(1, 2)?.contiguous()?;
        // Grouped-query attention without copying K/V: the query heads that share a K/V head
        // are stacked along the rows.
        let q = q.reshape((b, kvh, (h / kvh) * t, d))?;
        // bf16 products in inference passes only: a training step's checkpointed forward pass
        // (which takes no gradient) must equal its recomputation in the backward.
        let scoring = Scoring {
            bf16_products: self.scoring.bf16_products && ctx.pass.step.is_none(),
            ..self.scoring
        };
        let out = match past {
            Some(past) if !past.is_empty() => {
                let (k, v) = past.append(&k, &v)?;
                sdpa::attention_after_past(&q, &k, &v, mask, scoring)?
            }
            first => {
                if let Some(past) = first {
                    past.append(&k, &v)?;
                }
                let block = sdpa::block_rows(b, h, t);
                sdpa::attention(&q, &k, &v, mask, block, scoring)?
            }
        };
        let out = out
            .reshape((b, h, t, d))?
            .transpose(1, 2)?
            .reshape((b * t, h * d))?;
        let out = match rows {
            Some(rows) => out.index_select(rows, 0)?,
            None => out,
        };
        self.o_proj.forward(&out, ctx.pass)
    }
}

/// The gate and up projections: two matrices, or one fused `gate_up_proj` (gate columns first).
#[derive(Clone)]
pub enum GateUpProj {
    Separate { gate: Linear, up: Linear },
    Fused(Linear),
}

#[derive(Clone)]
pub struct Mlp {
    pub gate_up: GateUpProj,
    pub down_proj: Linear,
    activation: Activation,
}

impl Mlp {
    fn forward(&self, x: &Tensor, pass: Pass) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up {
            GateUpProj::Separate { gate, up } => (gate.forward(x, pass)?, up.forward(x, pass)?),
            GateUpProj::Fused(gate_up) => {
                let y = gate_up.forward(x, pass)?;
                let i = y.dim(D::Minus1)? / 2;
                (
                    y.narrow(D::Minus1, 0, i)?.contiguous()?,
                    y.narrow(D::Minus1, i, i)?.contiguous()?,
                )
            }
        };
        let hidden = match self.activation {
            Activation::Silu => swiglu::silu_mul(&gate, &up)?,
            Activation::GeluTanh => (gate.gelu()? * up)?,
        };
        self.down_proj.forward(&hidden, pass)
    }
}

#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Attention,
    /// Before the MLP; with sandwich norms, on the attention output instead.
    pub post_attention_layernorm: RmsNorm,
    /// Sandwich norms (Gemma 2): `pre_feedforward_layernorm` before the MLP and
    /// `post_feedforward_layernorm` on its output.
    feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    pub mlp: Mlp,
    /// Attends within the model's sliding window (all layers of Mistral, every other of Gemma 2).
    sliding: bool,
}

impl DecoderLayer {
    /// The layer's projections with their roles, in checkpoint order.
    pub fn projections(&self) -> Vec<(Role, &Linear)> {
        let (a, m) = (&self.self_attn, &self.mlp);
        let mut out = match &a.qkv {
            QkvProj::Separate { q, k, v } => vec![(Role::Q, q), (Role::K, k), (Role::V, v)],
            QkvProj::Fused(qkv) => vec![(Role::Qkv, qkv)],
        };
        out.push((Role::O, &a.o_proj));
        match &m.gate_up {
            GateUpProj::Separate { gate, up } => {
                out.extend([(Role::Gate, gate), (Role::Up, up)]);
            }
            GateUpProj::Fused(gate_up) => out.push((Role::GateUp, gate_up)),
        }
        out.push((Role::Down, &m.down_proj));
        out
    }

    /// The layer's projections with their roles, mutable (to attach or replace adapters).
    pub fn projections_mut(&mut self) -> Vec<(Role, &mut Linear)> {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        let mut out = match &mut a.qkv {
            QkvProj::Separate { q, k, v } => vec![(Role::Q, q), (Role::K, k), (Role::V, v)],
            QkvProj::Fused(qkv) => vec![(Role::Qkv, qkv)],
        };
        out.push((Role::O, &mut a.o_proj));
        match &mut m.gate_up {
            GateUpProj::Separate { gate, up } => {
                out.extend([(Role::Gate, gate), (Role::Up, up)]);
            }
            GateUpProj::Fused(gate_up) => out.push((Role::GateUp, gate_up)),
        }
        out.push((Role::Down, &mut m.down_proj));
        out
    }

    pub(crate) fn forward(&self, x: &Tensor, ctx: &Context) -> Result<Tensor> {
        self.forward_with_past(x, ctx, None, None)
    }

    /// The layer's output [rows, hidden] at `rows` of x [batch·seq, hidden] only (or all rows);
    /// with `past`, after the cached keys and values.
    fn forward_with_past(
        &self,
        x: &Tensor,
        ctx: &Context,
        past: Option<&mut LayerKv>,
        rows: Option<&Tensor>,
    ) -> Result<Tensor> {
        let mask = match &ctx.window_mask {
            Some(window) if self.sliding => window,
            _ => &ctx.mask,
        };
        let (cos, sin) = match &ctx.local_tables {
            Some((cos, sin)) if self.sliding => (cos, sin),
            _ => (&ctx.cos, &ctx.sin),
        };
        let attended = self.self_attn.forward(
            &self.input_layernorm.forward(x)?,
            ctx,
            (mask, cos, sin),
            past,
            rows,
        )?;
        let picked;
        let x = match rows {
            Some(rows) => {
                picked = x.index_select(rows, 0)?;
                &picked
            }
            None => x,
        };
        match &self.feedforward_norms {
            None => {
                let h = (x + attended)?;
                let mlp = self
                    .mlp
                    .forward(&self.post_attention_layernorm.forward(&h)?, ctx.pass)?;
                Ok((h + mlp)?)
            }
            Some((pre, post)) => {
                let h = (x + self.post_attention_layernorm.forward(&attended)?)?;
                let mlp = self.mlp.forward(&pre.forward(&h)?, ctx.pass)?;
                Ok((&h + post.forward(&mlp)?)?)
            }
        }
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
    /// The sliding-window layers' RoPE when they have their own base (Gemma 3).
    local_rope: Option<Rope>,
    device: Device,
}

impl CausalLm {
    /// Builds the model from checkpoint tensors with transformers' names.
    pub fn load(config: ModelConfig, weights: &Weights, device: &Device) -> Result<Self> {
        Self::load_quantized(config, weights, device, None)
    }

    /// As [`CausalLm::load`], with the projection weights held quantized in `quantize` (see
    /// [`Weights::projection`]); embeddings, norms, biases and the LM head stay in the weights' dtype.
    pub fn load_quantized(
        config: ModelConfig,
        weights: &Weights,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let c = &config;
        let text = c.text_model;
        // A tensor of the text model, under the first of its spellings the checkpoint holds.
        let stored = |name: &str| {
            let spellings = text.spellings(name);
            spellings
                .iter()
                .find(|n| weights.contains(n))
                .unwrap_or(&spellings[0])
                .clone()
        };
        let _loading = weights.show_loading(|name| text.module_name(name).is_some());
        let embed_tokens = weights.get(
            &stored(&format!("{}.embed_tokens.weight", text.decoder)),
            &[c.vocab_size, c.hidden_size],
        )?;
        let activations = match embed_tokens.dtype() {
            DType::BF16 | DType::F16 if device.is_cpu() => DType::F32,
            dtype => dtype,
        };
        let hid = c.hidden_size;
        let linear = |name: &str, p: &Projection| -> Result<Linear> {
            let (name_w, shape) = (stored(&format!("{name}.weight")), [p.out, p.inp]);
            let w = match quantize {
                Some(format) => weights.projection(&name_w, &shape, format)?,
                None => FrozenWeight::new(weights.get(&name_w, &shape)?).into(),
            };
            let b = if p.bias {
                Some(
                    weights
                        .get(&stored(&format!("{name}.bias")), &[p.out])?
                        .to_dtype(activations)?,
                )
            } else {
                None
            };
            Ok(Linear::new(w, b))
        };
        let norm_of = |name: &str, width: usize| -> Result<RmsNorm> {
            let mut weight = weights.get(&stored(&format!("{name}.weight")), &[width])?;
            if c.norm_gain_offset {
                // (1 + w) in f32 (f64 for an f64 model), as transformers' Gemma computes it.
                let acc = accumulation_dtype(weight.dtype());
                weight = (weight.to_dtype(acc)? + 1.0)?;
            }
            Ok(RmsNorm {
                weight: weight.to_dtype(activations)?,
                eps: c.rms_norm_eps,
            })
        };
        let projections = layout::projections(c);
        let norms = layout::norms(c);
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = text.layer(i);
            let mut linears = HashMap::new();
            for proj in &projections {
                let name = format!("{p}.{}", proj.role.path());
                linears.insert(proj.role, linear(&name, proj)?);
            }
            let mut norm_by_path = HashMap::new();
            for n in &norms {
                norm_by_path.insert(n.path, norm_of(&format!("{p}.{}", n.path), n.width)?);
            }
            let mut take = |role: Role| {
                linears
                    .remove(&role)
                    .with_context(|| format!("{p}: the layout has no {}", role.path()))
            };
            let qkv = if c.fused_projections {
                QkvProj::Fused(take(Role::Qkv)?)
            } else {
                QkvProj::Separate {
                    q: take(Role::Q)?,
                    k: take(Role::K)?,
                    v: take(Role::V)?,
                }
            };
            let gate_up = if c.fused_projections {
                GateUpProj::Fused(take(Role::GateUp)?)
            } else {
                GateUpProj::Separate {
                    gate: take(Role::Gate)?,
                    up: take(Role::Up)?,
                }
            };
            let (o_proj, down_proj) = (take(Role::O)?, take(Role::Down)?);
            let mut norm = |path: &str| {
                norm_by_path
                    .remove(path)
                    .with_context(|| format!("{p}: the layout has no {path}"))
            };
            layers.push(DecoderLayer {
                input_layernorm: norm("input_layernorm")?,
                self_attn: Attention {
                    qkv,
                    o_proj,
                    q_norm: c.qk_norm.then(|| norm("self_attn.q_norm")).transpose()?,
                    k_norm: c.qk_norm.then(|| norm("self_attn.k_norm")).transpose()?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    scoring: Scoring {
                        scale: c.attention_scale,
                        softcap: c.attn_logit_softcapping,
                        bf16_products: embed_tokens.dtype() == DType::BF16,
                    },
                },
                post_attention_layernorm: norm("post_attention_layernorm")?,
                feedforward_norms: if c.sandwich_norms {
                    Some((
                        norm("pre_feedforward_layernorm")?,
                        norm("post_feedforward_layernorm")?,
                    ))
                } else {
                    None
                },
                mlp: Mlp {
                    gate_up,
                    down_proj,
                    activation: c.activation,
                },
                sliding: c.sliding_layers.as_ref().is_none_or(|s| s[i]),
            });
        }
        let head = FrozenWeight::new(if c.tie_word_embeddings {
            embed_tokens.clone()
        } else {
            weights.get(&stored("lm_head.weight"), &[c.vocab_size, hid])?
        });
        Ok(Self {
            rope: Rope::new(c),
            local_rope: c.local_rope_theta.map(|theta| {
                Rope::new(&ModelConfig {
                    rope_theta: theta,
                    rope_scaling: RopeScaling::None,
                    ..c.clone()
                })
            }),
            norm: norm_of(&format!("{}.norm", text.decoder), hid)?,
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
        let ctx = self.layout_context(layout, (b, t), Pass::new(step))?;
        let mut x = self.embed(input_ids)?;
        let checkpointing = self.gradient_checkpointing && step.is_some();
        for layer in &self.layers {
            x = if checkpointing {
                let block = CheckpointedLayer {
                    layer: layer.clone(),
                    ctx: ctx.clone(),
                };
                checkpoint::forward(block, &x, &self.checkpoint_grads)?
            } else {
                layer.forward(&x, &ctx)?
            };
        }
        Ok(self
            .norm
            .forward(&x)?
            .reshape((b, t, self.config.hidden_size))?)
    }

    /// Final hidden states [rows, hidden] at `rows` of [batch·seq] (u32 indices) for token ids
    /// [batch, seq], without gradients. The last layer's output projection and MLP run at those
    /// rows only: scoring needs a few positions of each sequence (a question's answer), and
    /// every layer but the last must still run at all of them for the keys and values.
    pub fn hidden_states_at(
        &self,
        input_ids: &Tensor,
        layout: &TokenLayout,
        rows: &Tensor,
    ) -> Result<Tensor> {
        let ctx = self.layout_context(layout, input_ids.dims2()?, Pass::new(None))?;
        let mut x = self.embed(input_ids)?;
        let Some((last, layers)) = self.layers.split_last() else {
            return self.norm.forward(&x.index_select(rows, 0)?);
        };
        for layer in layers {
            x = layer.forward(&x, &ctx)?;
        }
        self.norm
            .forward(&last.forward_with_past(&x, &ctx, None, Some(rows))?)
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
        let shape = (b, 1, t, cache.len());
        let mask = Tensor::from_vec(step.mask, shape, &self.device)?;
        let window_mask = step
            .window_mask
            .map(|m| Tensor::from_vec(m, shape, &self.device))
            .transpose()?;
        let masks = (mask, window_mask);
        let ctx = self.context(&step.position_ids, (b, t), masks, Pass::new(None))?;
        let mut x = self.embed(input_ids)?;
        for (layer, past) in self.layers.iter().zip(cache.layers_mut()) {
            x = layer.forward_with_past(&x, &ctx, Some(past), None)?;
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

    /// The per-forward tables of a whole-sequence pass over `layout` (see [`Self::context`]).
    fn layout_context(
        &self,
        layout: &TokenLayout,
        dims: (usize, usize),
        pass: Pass,
    ) -> Result<Context> {
        let mask = layout.mask(None, &self.device)?;
        let window_mask = self
            .config
            .sliding_window
            .map(|w| layout.mask(Some(w), &self.device))
            .transpose()?;
        self.context(&layout.position_ids, dims, (mask, window_mask), pass)
    }

    /// The per-forward tables: RoPE at the given positions, the masks (without and with the
    /// sliding window) in the accumulation dtype.
    fn context(
        &self,
        position_ids: &[u32],
        (b, t): (usize, usize),
        (mask, window_mask): (Tensor, Option<Tensor>),
        pass: Pass,
    ) -> Result<Context> {
        let (cos, sin) = self.rope.tables(position_ids, b, t, &self.device)?;
        let local_tables = self
            .local_rope
            .as_ref()
            .map(|rope| rope.tables(position_ids, b, t, &self.device))
            .transpose()?;
        let acc = accumulation_dtype(self.dtype());
        Ok(Context {
            batch: b,
            seq: t,
            cos,
            sin,
            mask: mask.to_dtype(acc)?,
            window_mask: window_mask.map(|m| m.to_dtype(acc)).transpose()?,
            local_tables,
            pass,
        })
    }

    /// Token embeddings [batch·seq, hidden] of ids [batch, seq]: the layers work on rows, so
    /// that no reshape (each a copy in candle's backward) sits between their ops.
    fn embed(&self, input_ids: &Tensor) -> Result<Tensor> {
        let x = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .to_dtype(self.activations)?;
        if !self.config.scale_embeddings {
            return Ok(x);
        }
        // transformers rounds √hidden to the activations' dtype first.
        let normalizer = Tensor::new((self.config.hidden_size as f64).sqrt(), &self.device)?
            .to_dtype(self.activations)?;
        Ok(x.broadcast_mul(&normalizer)?)
    }

    /// The adapter gradients that checkpointed layers computed since the last call, by variable.
    pub fn take_checkpoint_grads(
        &self,
    ) -> std::collections::HashMap<candle_core::TensorId, Tensor> {
        checkpoint::take(&self.checkpoint_grads)
    }

    /// Logits [n, vocab] (f32, or f64 for an f64 model) for hidden states [n, hidden], capped
    /// to cap·tanh(logit/cap) when the model caps them.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = if hidden.track_op() {
            frozen_matmul(hidden, &ProjectionWeight::Dense(self.head.clone()))?
                .to_dtype(accumulation_dtype(self.dtype()))?
        } else {
            let head = self.head.tensor();
            let flops = 2 * hidden.elem_count() * head.dim(0)?;
            timed(Phase::LmHead, flops, || {
                match self.head.transposed_product_f32(hidden)? {
                    Some(logits) => {
                        Tensor::from_vec(logits, (hidden.dim(0)?, head.dim(0)?), hidden.device())
                    }
                    None => matmul_wide(hidden, &head.t()?),
                }
            })?
        };
        Ok(match self.config.final_logit_softcapping {
            Some(cap) => super::kernels::softcap::tensor(&logits, cap, false)?.0,
            None => logits,
        })
    }

    /// −log p(target) [n] (f32, or f64 for an f64 model) for hidden states [n, hidden] and target
    /// ids [n]; the logits exist one block of rows at a time.
    pub fn target_nll(&self, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        let block = cross_entropy::block_rows(hidden.dim(0)?, self.config.vocab_size);
        Ok(cross_entropy::head_nll(
            hidden,
            &self.head,
            targets,
            block,
            self.config.final_logit_softcapping,
        )?)
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

    /// Every linear layer with its full module name as transformers and PEFT name it
    /// (`model.layers.0.self_attn.q_proj`; `model.language_model.layers.0...` in a multimodal model).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let text = self.config.text_model;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.extend(
                l.projections()
                    .into_iter()
                    .map(|(role, lin)| (format!("{}.{}", text.layer(i), role.path()), lin)),
            );
        }
        out
    }

    /// Every linear layer with its full module name, mutable (to attach or replace adapters).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let text = self.config.text_model;
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.extend(
                l.projections_mut()
                    .into_iter()
                    .map(|(role, lin)| (format!("{}.{}", text.layer(i), role.path()), lin)),
            );
        }
        out
    }
}
