//! Rotary position embeddings as transformers computes them (default, linear and llama3 scaling),
//! applied with differentiable ops (candle's fused rope has no backward).

use anyhow::Result;
use candle_core::{Device, Tensor, D};

use super::config::{ModelConfig, RopeScaling};

/// The inverse frequencies of one head, after scaling.
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(config: &ModelConfig) -> Self {
        let dim = config.head_dim;
        let base = config.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..dim / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / dim as f32))
            .collect();
        match config.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv_freq.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old_len,
            } => {
                let (factor, low, high, old_len) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    old_len as f32,
                );
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                for f in inv_freq.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_freq_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let is_medium = wavelen >= high_freq_wavelen && wavelen <= low_freq_wavelen;
                    *f = if is_medium {
                        let smooth = (old_len / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        Self { inv_freq }
    }

    /// cos and sin tables of shape [batch, 1, seq, head_dim] for the given position ids.
    pub fn tables(
        &self,
        position_ids: &[u32],
        batch: usize,
        seq: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(position_ids.len() * half * 2);
        let mut sin = Vec::with_capacity(position_ids.len() * half * 2);
        for &p in position_ids {
            let angles: Vec<f32> = self.inv_freq.iter().map(|f| f * p as f32).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos()));
                sin.extend(angles.iter().map(|a| a.sin()));
            }
        }
        let shape = (batch, 1, seq, half * 2);
        Ok((
            Tensor::from_vec(cos, shape, device)?,
            Tensor::from_vec(sin, shape, device)?,
        ))
    }
}

/// x·cos + rotate_half(x)·sin for x [batch, heads, seq, head_dim].
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.to_dtype(x.dtype())?;
    let sin = sin.to_dtype(x.dtype())?;
    Ok((x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?)
}
