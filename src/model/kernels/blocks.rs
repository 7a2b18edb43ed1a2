//! Splitting a dimension into even blocks under a memory budget, for the ops that hold one block
//! of a large intermediate at a time (attention scores, LM-head logits).

/// Items per block when `count` items of `item_bytes` each are split evenly into blocks of at
/// most `budget` bytes: all of them when they fit, never fewer than one.
pub fn even_block(count: usize, item_bytes: usize, budget: usize) -> usize {
    let count = count.max(1);
    let max_items = (budget / item_bytes.max(1)).clamp(1, count);
    count.div_ceil(count.div_ceil(max_items))
}

/// The start and length of each block of `block` items over `count` items.
pub fn ranges(count: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    let block = block.max(1);
    (0..count)
        .step_by(block)
        .map(move |start| (start, block.min(count - start)))
}
