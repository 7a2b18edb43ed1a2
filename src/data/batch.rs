//! Padding examples (single samples or packed rows) into batches the model consumes.

use anyhow::Result;
use candle_core::{Device, Tensor};

use super::Example;
use crate::model::TokenLayout;

/// Label value that takes no loss (PyTorch's ignore_index).
pub const IGNORE_INDEX: i64 = -100;

/// A right-padded batch: ids [batch, seq], labels (IGNORE_INDEX on padding), token layout.
pub struct Batch {
    pub input_ids: Tensor,
    pub labels: Vec<i64>,
    pub layout: TokenLayout,
    /// Tokens the loss is computed on.
    pub target_tokens: usize,
    /// All non-padding tokens.
    pub tokens: usize,
}

impl Batch {
    /// Pads `examples` to the longest one with `pad_id`; positions restart for every packed sample.
    pub fn pad(examples: &[&Example], pad_id: u32, device: &Device) -> Result<Self> {
        let b = examples.len();
        let t = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut ids = vec![pad_id; b * t];
        let mut labels = vec![IGNORE_INDEX; b * t];
        let mut position_ids = vec![0u32; b * t];
        let mut segment_ids = vec![u32::MAX; b * t];
        for (row, e) in examples.iter().enumerate() {
            let base = row * t;
            ids[base..base + e.input_ids.len()].copy_from_slice(&e.input_ids);
            labels[base..base + e.labels.len()].copy_from_slice(&e.labels);
            let mut offset = base;
            for (segment, &len) in e.segments.iter().enumerate() {
                for p in 0..len {
                    position_ids[offset + p] = p as u32;
                    segment_ids[offset + p] = segment as u32;
                }
                offset += len;
            }
            // Padding attends only to padding and sits at positions after the row's content.
            for (p, pos) in position_ids[offset..base + t].iter_mut().enumerate() {
                *pos = p as u32;
            }
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (b, t), device)?,
            labels,
            layout: TokenLayout {
                batch: b,
                seq: t,
                position_ids,
                segment_ids,
                parents: Vec::new(),
            },
            target_tokens: examples.iter().map(|e| e.target_count()).sum(),
            tokens: examples.iter().map(|e| e.input_ids.len()).sum(),
        })
    }
}
