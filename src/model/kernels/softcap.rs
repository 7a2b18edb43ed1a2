//! Gemma's soft-capping of attention scores and final logits, x ↦ cap·tanh(x/cap), with its
//! derivative 1 − tanh(x/cap)² for the backward passes that need it: one helper for tensors, one
//! for rows of numbers in place.

use candle_core::{Result, Tensor};
use num_traits::Float;

/// `x` capped at `cap` and, with `slopes`, the cap's derivative at each element.
pub fn tensor(x: &Tensor, cap: f64, slopes: bool) -> Result<(Tensor, Option<Tensor>)> {
    let t = (x / cap)?.tanh()?;
    let slope = match slopes {
        true => Some(t.sqr()?.affine(-1.0, 1.0)?),
        false => None,
    };
    Ok(((t * cap)?, slope))
}

/// Caps `row` in place at `cap`; with `slopes`, writes the cap's derivative of each element there.
pub fn row<T: Float>(row: &mut [T], cap: T, slopes: Option<&mut [T]>) {
    match slopes {
        Some(slopes) => row.iter_mut().zip(slopes).for_each(|(x, slope)| {
            let t = (*x / cap).tanh();
            *x = t * cap;
            *slope = T::one() - t * t;
        }),
        None => row.iter_mut().for_each(|x| *x = (*x / cap).tanh() * cap),
    }
}
