//! Learning-rate schedules with linear warm-up, as transformers' get_*_schedule_with_warmup.

use crate::recipe::Schedule;

/// The learning rate for optimizer step `step` (0-based) of `total`.
pub fn lr_at(schedule: Schedule, base_lr: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base_lr * step as f64 / warmup.max(1) as f64;
    }
    let decay_steps = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / decay_steps;
    let factor = match schedule {
        Schedule::Constant => 1.0,
        Schedule::Linear => (1.0 - progress).max(0.0),
        Schedule::Cosine => (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    };
    base_lr * factor
}
