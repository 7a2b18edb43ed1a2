//! Packing: several samples per row of `max_seq_len` tokens. Each sample keeps its own positions
//! (restarting at 0) and attention never crosses samples, so a packed batch has the same loss as
//! the samples unpacked.

use super::{Example, IGNORE_INDEX};

/// Greedily fills rows in the given order; a sample that does not fit starts a new row.
pub fn pack(examples: Vec<Example>, max_len: usize) -> Vec<Example> {
    let mut rows: Vec<Example> = Vec::new();
    let mut current = Example {
        input_ids: Vec::new(),
        labels: Vec::new(),
        segments: Vec::new(),
    };
    for mut e in examples {
        if !current.input_ids.is_empty() && current.input_ids.len() + e.input_ids.len() > max_len {
            rows.push(std::mem::replace(
                &mut current,
                Example {
                    input_ids: Vec::new(),
                    labels: Vec::new(),
                    segments: Vec::new(),
                },
            ));
        }
        // A sample's first label is never a target of its own; masking it keeps the previous
        // sample's last position from predicting across the boundary.
        if let Some(first) = e.labels.first_mut() {
            *first = IGNORE_INDEX;
        }
        current.segments.push(e.input_ids.len());
        current.input_ids.append(&mut e.input_ids);
        current.labels.append(&mut e.labels);
    }
    if !current.input_ids.is_empty() {
        rows.push(current);
    }
    rows
}

/// Real tokens over row capacity (rows × max_len).
pub fn efficiency(rows: &[Example], max_len: usize) -> f64 {
    if rows.is_empty() {
        return 0.0;
    }
    rows.iter().map(|r| r.input_ids.len()).sum::<usize>() as f64 / (rows.len() * max_len) as f64
}
