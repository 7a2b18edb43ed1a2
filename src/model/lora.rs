//! LoRA with PEFT's exact semantics: y = W·x + s·B·A·dropout(x), s = alpha/r (rsLoRA: alpha/√r),
//! A kaiming-uniform(a=√5), B zero; target matching as PEFT does it.

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::kernels::lora_linear::lora_linear;
use super::kernels::projection_weight::ProjectionWeight;

/// Which linear layers get adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// Module names matched by suffix, as PEFT does (`q_proj` matches `model.layers.3.self_attn.q_proj`).
    Names(Vec<String>),
    /// `"all-linear"`, or a regular expression that must match the whole module name.
    Pattern(String),
}

impl TargetModules {
    /// Whether the module with this full name (e.g. `model.layers.0.self_attn.q_proj`) is targeted.
    pub fn matches(&self, full_name: &str) -> Result<bool> {
        Ok(match self {
            TargetModules::Names(names) => names
                .iter()
                .any(|n| full_name == n || full_name.ends_with(&format!(".{n}"))),
            TargetModules::Pattern(p) if p == "all-linear" => true,
            TargetModules::Pattern(p) => {
                let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| {
                    anyhow::anyhow!("target_modules pattern `{p}` is not a valid regex: {e}")
                })?;
                re.is_match(full_name)
            }
        })
    }

    /// The short names of the modules this selects among `available`, for adapter_config.json.
    pub fn resolve(&self, available: &[String]) -> Result<Vec<String>> {
        if let TargetModules::Names(names) = self {
            for n in names {
                if !available
                    .iter()
                    .any(|a| a == n || a.ends_with(&format!(".{n}")))
                {
                    bail!(
                        "target_modules entry `{n}` matches no linear layer of this model; choose from {} or \"all-linear\"",
                        short_names(available).join(", ")
                    );
                }
            }
        }
        let mut short: Vec<String> = Vec::new();
        for full in available {
            if self.matches(full)? {
                let s = full.rsplit('.').next().unwrap_or(full).to_string();
                if !short.contains(&s) {
                    short.push(s);
                }
            }
        }
        if short.is_empty() {
            bail!("target_modules {self:?} matches no linear layer of this model");
        }
        short.sort();
        Ok(short)
    }
}

/// The distinct last parts of module names (`q_proj` of `model.layers.0.self_attn.q_proj`), in
/// order of first appearance.
fn short_names(modules: &[String]) -> Vec<String> {
    let mut short: Vec<String> = Vec::new();
    for full in modules {
        let s = full.rsplit('.').next().unwrap_or(full).to_string();
        if !short.contains(&s) {
            short.push(s);
        }
    }
    short
}

/// The hyper-parameters of a LoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

impl LoraConfig {
    /// The factor s in y = W·x + s·B·A·x.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// How a forward pass runs: the training step (LoRA dropout on) or None (evaluation), and whether
/// the adapters join the autograd graph (off for the first pass of a checkpointed layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub step: Option<u64>,
    pub track: bool,
}

impl Pass {
    /// A pass that records gradients to the adapters; `step` None disables dropout.
    pub fn new(step: Option<u64>) -> Self {
        Self { step, track: true }
    }
}

/// The trainable low-rank pair attached to one frozen projection.
#[derive(Clone)]
pub struct LoraAdapter {
    /// A: [r, in_features].
    pub a: Var,
    /// B: [out_features, r].
    pub b: Var,
    pub scale: f64,
    pub dropout: f64,
    /// Seeds this module's dropout masks together with the step, so a resumed run draws the same masks.
    pub dropout_seed: u64,
}

impl LoraAdapter {
    /// PEFT's default initialisation: A ~ U(-1/√in, 1/√in) (kaiming-uniform with a=√5), B = 0.
    pub fn init(
        config: &LoraConfig,
        in_features: usize,
        out_features: usize,
        rng: &mut ChaCha8Rng,
        device: &Device,
    ) -> Result<Self> {
        let bound = 1.0 / (in_features as f64).sqrt();
        let a: Vec<f32> = (0..config.r * in_features)
            .map(|_| rng.random_range(-bound..bound) as f32)
            .collect();
        let a = Tensor::from_vec(a, (config.r, in_features), device)?;
        let b = Tensor::zeros((out_features, config.r), DType::F32, device)?;
        Self::from_tensors(config, a, b, DType::F32, rng.random())
    }

    /// An adapter from given A and B (e.g. loaded from a file), held in `dtype`.
    pub fn from_tensors(
        config: &LoraConfig,
        a: Tensor,
        b: Tensor,
        dtype: DType,
        dropout_seed: u64,
    ) -> Result<Self> {
        Ok(Self {
            a: Var::from_tensor(&a.to_dtype(dtype)?)?,
            b: Var::from_tensor(&b.to_dtype(dtype)?)?,
            scale: config.scale(),
            dropout: config.dropout,
            dropout_seed,
        })
    }

    /// x·Wᵀ + s·B·A·dropout(x) for x [n, in] and the frozen W of this adapter's projection, as one
    /// op; dropout is active when the pass has a step.
    pub fn apply(&self, x: &Tensor, weight: &ProjectionWeight, pass: Pass) -> Result<Tensor> {
        let mask = match pass.step {
            Some(step) if self.dropout > 0.0 => Some(self.dropout_mask(x, step)?),
            _ => None,
        };
        let (a, b) = if pass.track {
            (self.a.as_tensor().clone(), self.b.as_tensor().clone())
        } else {
            (self.a.as_tensor().detach(), self.b.as_tensor().detach())
        };
        Ok(lora_linear(x, weight, &a, &b, self.scale, mask.as_ref())?)
    }

    /// The inverted-dropout mask for x (0 or 1/keep, in the adapter's dtype), drawn from
    /// (module seed, step): deterministic and resumable. On the CPU it comes from ChaCha8 (the
    /// same on every machine); on a GPU from the device's own generator reseeded with the same
    /// value (drawing a 1B model's masks on the CPU and copying them over would cost seconds per step).
    fn dropout_mask(&self, x: &Tensor, step: u64) -> Result<Tensor> {
        let keep = 1.0 - self.dropout;
        let seed = self.dropout_seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mask = if x.device().is_cpu() {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mask: Vec<f32> = (0..x.elem_count())
                .map(|_| {
                    if rng.random::<f64>() < keep {
                        (1.0 / keep) as f32
                    } else {
                        0.0
                    }
                })
                .collect();
            Tensor::from_vec(mask, x.shape(), x.device())?
        } else {
            x.device().set_seed(seed)?;
            let uniform = Tensor::rand(0f32, 1f32, x.shape(), x.device())?;
            (uniform.lt(keep)?.to_dtype(DType::F32)? * (1.0 / keep))?
        };
        Ok(mask.to_dtype(self.a.dtype())?)
    }

    /// The dense update s·B·A of shape [out, in], for merging into W.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self
            .b
            .as_tensor()
            .matmul(self.a.as_tensor())?
            .affine(self.scale, 0.0)?)
    }
}
