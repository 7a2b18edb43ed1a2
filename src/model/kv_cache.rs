//! Keys and values of the positions a model has already read, per layer, so that inference reads
//! each token once: greedy generation reads the prompts, then feeds one new token per step.
//!
//! Rows may hold padding (prompts of different lengths are right-padded): each row remembers which
//! of its slots are real tokens and at which position, and new tokens attend to real slots only.

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};

/// Token rows right-padded with `pad` into ids [rows, longest] (at least one column), with each
/// row's real length: the input of [`crate::model::CausalLm::hidden_states_cached`].
pub fn right_padded(rows: &[&[u32]], pad: u32, device: &Device) -> Result<(Tensor, Vec<usize>)> {
    let real: Vec<usize> = rows.iter().map(|r| r.len()).collect();
    let t = real.iter().copied().max().unwrap_or(0).max(1);
    let mut ids = vec![pad; rows.len() * t];
    for (i, row) in rows.iter().enumerate() {
        ids[i * t..i * t + row.len()].copy_from_slice(row);
    }
    Ok((Tensor::from_vec(ids, (rows.len(), t), device)?, real))
}

/// One layer's cached keys and values, [batch, kv_heads, slots, head_dim] each.
pub struct LayerKv {
    cache: candle_nn::kv_cache::KvCache,
}

impl LayerKv {
    fn new(capacity: usize) -> Self {
        Self {
            cache: candle_nn::kv_cache::KvCache::new(2, capacity),
        }
    }

    /// True before the first append.
    pub fn is_empty(&self) -> bool {
        self.cache.k_cache().current_seq_len() == 0
    }

    /// Appends new keys and values [batch, kv_heads, t, head_dim]; returns all of them so far.
    pub fn append(&mut self, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.cache.append(k, v)?)
    }
}

/// What each row's slots hold.
#[derive(Clone)]
struct Row {
    /// Position id of each slot.
    positions: Vec<u32>,
    /// Whether each slot is a real token (not padding).
    real: Vec<bool>,
    /// Real tokens so far: the position of the row's next token.
    next_position: u32,
}

/// The positions and additive mask of one step of new tokens.
pub struct Step {
    /// [batch * t] position ids of the new tokens.
    pub position_ids: Vec<u32>,
    /// [batch, t, slots] (0 or −∞): what each new token may attend to, its own slot included.
    pub mask: Vec<f32>,
    /// The same within the sliding window, for the layers that have one.
    pub window_mask: Option<Vec<f32>>,
}

/// The cache of a whole model for a batch of rows.
pub struct KvCache {
    layers: Vec<LayerKv>,
    rows: Vec<Row>,
}

impl KvCache {
    /// An empty cache for `layers` layers and `batch` rows, with room for `capacity` slots before
    /// it grows.
    pub fn new(layers: usize, batch: usize, capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            layers: (0..layers).map(|_| LayerKv::new(capacity)).collect(),
            rows: vec![
                Row {
                    positions: Vec::new(),
                    real: Vec::new(),
                    next_position: 0,
                };
                batch
            ],
        }
    }

    /// Slots per row (real and padding).
    pub fn len(&self) -> usize {
        self.rows.first().map_or(0, |r| r.real.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes `t` new slots in every row, of which row r's first `real[r]` are real tokens, and
    /// returns their positions and the masks: a real token sees the real slots before it (in the
    /// window mask, only those within `window` positions); padding sees only itself.
    pub fn extend(&mut self, real: &[usize], t: usize, window: Option<usize>) -> Result<Step> {
        if real.len() != self.rows.len() || real.iter().any(|&n| n > t) {
            bail!(
                "KV cache: {} rows of up to {t} new tokens do not fit a cache of {} rows",
                real.len(),
                self.rows.len()
            );
        }
        let slots = self.len() + t;
        let mut position_ids = Vec::with_capacity(real.len() * t);
        let mut mask = vec![f32::NEG_INFINITY; real.len() * t * slots];
        let mut window_mask = window.map(|_| mask.clone());
        for (r, (row, &n)) in self.rows.iter_mut().zip(real).enumerate() {
            let old = row.real.len();
            for j in 0..t {
                let is_real = j < n;
                row.positions.push(row.next_position + j as u32);
                row.real.push(is_real);
            }
            for j in 0..t {
                let q_slot = old + j;
                let q_pos = row.positions[q_slot];
                position_ids.push(q_pos);
                let range = (r * t + j) * slots..(r * t + j + 1) * slots;
                let line = &mut mask[range.clone()];
                let mut window_line = window_mask.as_mut().map(|m| &mut m[range]);
                if !row.real[q_slot] {
                    line[q_slot] = 0.0;
                    if let Some(w) = window_line.as_deref_mut() {
                        w[q_slot] = 0.0;
                    }
                    continue;
                }
                for (k_slot, m) in line.iter_mut().enumerate().take(q_slot + 1) {
                    let k_pos = row.positions[k_slot];
                    if !(row.real[k_slot] && k_pos <= q_pos) {
                        continue;
                    }
                    *m = 0.0;
                    if let (Some(w), Some(line)) = (window, window_line.as_deref_mut()) {
                        if ((q_pos - k_pos) as usize) < w {
                            line[k_slot] = 0.0;
                        }
                    }
                }
            }
            row.next_position += n as u32;
        }
        Ok(Step {
            position_ids,
            mask,
            window_mask,
        })
    }

    /// Each layer's cache, to hand to the layers in order.
    pub fn layers_mut(&mut self) -> impl Iterator<Item = &mut LayerKv> {
        self.layers.iter_mut()
    }
}
