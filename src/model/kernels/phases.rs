//! Where a step's time goes: wall time and floating-point work per phase (projections with their
//! adapters, attention, the LM head's loss, the optimizer), summed over the ops of each phase, for
//! `bench` to print beside its totals. Counting is off unless [`enable`]d, and costs two clock
//! reads per op when on. The ops run synchronously on the CPU; on a GPU the times are launch times.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A phase of a forward or backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The frozen projections with their LoRA adapters, forward and backward.
    Projections,
    /// Scaled dot-product attention, forward and backward.
    Attention,
    /// The LM head's logits, softmax and loss (and their gradient directions).
    LmHead,
    /// Gradient norm, clipping and the AdamW update.
    Optimizer,
}

pub const PHASES: [Phase; 4] = [
    Phase::Projections,
    Phase::Attention,
    Phase::LmHead,
    Phase::Optimizer,
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];
static FLOPS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// Starts counting (from zero).
pub fn enable() {
    for i in 0..PHASES.len() {
        NANOS[i].store(0, Ordering::Relaxed);
        FLOPS[i].store(0, Ordering::Relaxed);
    }
    ENABLED.store(true, Ordering::Relaxed);
}

/// Runs `f`, counting its time and `flops` floating-point operations under `phase` when enabled.
pub fn timed<T>(phase: Phase, flops: usize, f: impl FnOnce() -> T) -> T {
    if !ENABLED.load(Ordering::Relaxed) {
        return f();
    }
    let started = Instant::now();
    let out = f();
    let i = phase as usize;
    NANOS[i].fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
    FLOPS[i].fetch_add(flops as u64, Ordering::Relaxed);
    out
}

/// Seconds and floating-point operations counted per phase since [`enable`]; stops counting.
pub fn take() -> Vec<(Phase, f64, f64)> {
    ENABLED.store(false, Ordering::Relaxed);
    PHASES
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let seconds = NANOS[i].load(Ordering::Relaxed) as f64 * 1e-9;
            (p, seconds, FLOPS[i].load(Ordering::Relaxed) as f64)
        })
        .collect()
}
