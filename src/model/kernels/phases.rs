//! Where a step's time goes: wall time and floating-point work per phase (the frozen projections,
//! their LoRA adapters, the fused element-wise kernels, attention, the LM head's loss, the
//! optimizer), summed over the ops of each phase, for `bench` to print beside its totals. A phase
//! timed inside another counts for itself only: the outer one is charged its own time less the
//! inner one's. Counting is off unless [`enable`]d, and costs two clock reads per op when on. The
//! ops run synchronously on the CPU; on a GPU the times are launch times.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// A phase of a forward or backward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The frozen projections, forward and input gradient.
    Projections,
    /// The LoRA adapters' products beside the frozen ones (x·Aᵀ, its product with Bᵀ, and their
    /// gradients), forward and backward.
    Adapters,
    /// The fused element-wise kernels (RMSNorm, RoPE, SiLU·up), forward and backward.
    Elementwise,
    /// Scaled dot-product attention, forward and backward.
    Attention,
    /// The LM head's logits, softmax and loss (and their gradient directions).
    LmHead,
    /// Gradient norm, clipping and the AdamW update.
    Optimizer,
}

pub const PHASES: [Phase; 6] = [
    Phase::Projections,
    Phase::Adapters,
    Phase::Elementwise,
    Phase::Attention,
    Phase::LmHead,
    Phase::Optimizer,
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static NANOS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];
static FLOPS: [AtomicU64; PHASES.len()] = [const { AtomicU64::new(0) }; PHASES.len()];

thread_local! {
    /// Nanoseconds spent so far in phases timed inside the one running on this thread.
    static INNER: Cell<u64> = const { Cell::new(0) };
}

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
    let outer_inner = INNER.replace(0);
    let started = Instant::now();
    let out = f();
    let elapsed = started.elapsed().as_nanos() as u64;
    let inner = INNER.replace(outer_inner + elapsed);
    let i = phase as usize;
    NANOS[i].fetch_add(elapsed.saturating_sub(inner), Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_phase_inside_another_is_charged_to_itself_only() {
        enable();
        timed(Phase::Projections, 10, || {
            std::thread::sleep(Duration::from_millis(20));
            timed(Phase::Adapters, 1, || {
                std::thread::sleep(Duration::from_millis(40))
            });
        });
        let counted = take();
        let (_, outer, flops) = counted[Phase::Projections as usize];
        let (_, inner, _) = counted[Phase::Adapters as usize];
        assert!((0.02..0.04).contains(&outer), "outer phase {outer} s");
        assert!(inner >= 0.04, "inner phase {inner} s");
        assert_eq!(flops, 10.0);
    }
}
