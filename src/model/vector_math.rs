//! Vectorised row kernels for the softmaxes on the CPU (LM head, attention): the maximum of a row,
//! exp(x − shift) in place with the sum, and scaling. The exponential is a polynomial (Cephes'
//! `expf`, within 2 ulp of the libm one), written as plain lane-wise arithmetic so the compiler
//! vectorises it; each kernel is compiled for AVX-512 and for AVX2+FMA as well as for the
//! baseline, and the best one the CPU has is chosen at run time.

use std::sync::OnceLock;

/// The largest element of `row` (−∞ when empty; NaNs are skipped as `f32::max` does).
pub fn max(row: &[f32]) -> f32 {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { max_avx512(row) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { max_avx2(row) },
        Level::Baseline => max_body(row),
    }
}

/// Replaces each x of `row` with exp(x − shift) and returns their sum.
pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { exp_avx512(row, shift) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { exp_avx2(row, shift) },
        Level::Baseline => exp_body(row, shift),
    }
}

/// Multiplies each element of `row` by `factor`.
pub fn scale(row: &mut [f32], factor: f32) {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => unsafe { scale_avx512(row, factor) },
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => unsafe { scale_avx2(row, factor) },
        Level::Baseline => scale_body(row, factor),
    }
}

/// e^x as the kernels compute it, one value at a time (for tests and short tails).
pub fn exp(x: f32) -> f32 {
    exp_lane(x)
}

/// The instruction sets the kernels are compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Level {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Baseline,
}

fn level() -> Level {
    static LEVEL: OnceLock<Level> = OnceLock::new();
    *LEVEL.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Level {
    if is_x86_feature_detected!("avx512f") {
        Level::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Level::Avx2
    } else {
        Level::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Level {
    Level::Baseline
}

/// Lanes the bodies work in (one AVX-512 register of f32).
const LANES: usize = 16;

/// Below this, e^x is under f32's smallest normal and the kernels return 0 (as for −∞).
const EXP_LOW: f32 = -87.336_55;
/// Above this (127.5·ln 2) the kernels return +∞; libm's e^x overflows only above 88.72, but the
/// softmaxes only ever take e^x of x ≤ 0.
const EXP_HIGH: f32 = 88.376_26;

/// Cephes' `expf`: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by a degree-7 polynomial, 2ⁿ by the
/// exponent bits.
#[inline(always)]
fn exp_lane(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let clamped = x.clamp(EXP_LOW, EXP_HIGH);
    let n = (clamped * LOG2E + 0.5).floor();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p.mul_add(r, 1.398_199_9e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let y = p.mul_add(r * r, r + 1.0);
    // n + 127 lies in 1..=254 after the clamp, a valid biased exponent. Added to 2²³ it becomes
    // the low mantissa bits of a float, which the shift moves into the exponent field (an integer
    // conversion would be scalar: Rust's saturating `as` does not vectorise).
    let biased = n + (127.0 + 8_388_608.0);
    let two_n = f32::from_bits(biased.to_bits() << 23);
    let e = y * two_n;
    // Selects rather than branches, so the lanes vectorise; a NaN passes through the clamp.
    let e = if x < EXP_LOW { 0.0 } else { e };
    if x > EXP_HIGH {
        f32::INFINITY
    } else {
        e
    }
}

#[inline(always)]
fn max_body(row: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a = a.max(*v);
        }
    }
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, v| m.max(*v));
    acc.iter().fold(tail, |m, v| m.max(*v))
}

#[inline(always)]
fn exp_body(row: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk.iter_mut()) {
            *v = exp_lane(*v - shift);
            *a += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_lane(*v - shift);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn scale_body(row: &mut [f32], factor: f32) {
    row.iter_mut().for_each(|v| *v *= factor);
}

/// Instantiates a body for one instruction set.
macro_rules! compiled_for {
    ($features:literal: $max:ident, $exp:ident, $scale:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $max(row: &[f32]) -> f32 {
            max_body(row)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $exp(row: &mut [f32], shift: f32) -> f32 {
            exp_body(row, shift)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $features)]
        unsafe fn $scale(row: &mut [f32], factor: f32) {
            scale_body(row, factor)
        }
    };
}

compiled_for!("avx512f,fma": max_avx512, exp_avx512, scale_avx512);
compiled_for!("avx2,fma": max_avx2, exp_avx2, scale_avx2);

#[cfg(test)]
mod tests {
    use super::*;

    /// Every compiled variant this CPU can run, with its name.
    fn variants() -> Vec<(&'static str, Level)> {
        let mut out = vec![("baseline", Level::Baseline)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                out.push(("avx2", Level::Avx2));
            }
            if is_x86_feature_detected!("avx512f") {
                out.push(("avx512", Level::Avx512));
            }
        }
        out
    }

    fn run_exp(level: Level, row: &mut [f32], shift: f32) -> f32 {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { exp_avx512(row, shift) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { exp_avx2(row, shift) },
            Level::Baseline => exp_body(row, shift),
        }
    }

    fn run_max(level: Level, row: &[f32]) -> f32 {
        match level {
            #[cfg(target_arch = "x86_64")]
            Level::Avx512 => unsafe { max_avx512(row) },
            #[cfg(target_arch = "x86_64")]
            Level::Avx2 => unsafe { max_avx2(row) },
            Level::Baseline => max_body(row),
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_exact_at_the_ends() {
        let xs: Vec<f32> = (0..200_003)
            .map(|i| -90.0 + 180.0 * i as f32 / 200_000.0)
            .chain([0.0, -0.0, 1.0, f32::NEG_INFINITY, f32::MIN, -1e30, 1e-30])
            .collect();
        for (name, level) in variants() {
            let mut got = xs.clone();
            run_exp(level, &mut got, 0.0);
            for (x, g) in xs.iter().zip(&got) {
                let want = x.exp();
                if *x < EXP_LOW {
                    assert_eq!(*g, 0.0, "{name}: exp({x})");
                    continue;
                }
                if *x > EXP_HIGH {
                    assert_eq!(*g, f32::INFINITY, "{name}: exp({x})");
                    continue;
                }
                let ulp = (want.to_bits() as i64 - g.to_bits() as i64).abs();
                assert!(ulp <= 2, "{name}: exp({x}) = {g}, libm {want} ({ulp} ulp)");
            }
            let mut shifted: Vec<f32> = xs.iter().map(|x| x.min(0.0)).collect();
            let want_sum: f64 = shifted.iter().map(|x| (*x as f64).exp()).sum();
            let sum = run_exp(level, &mut shifted, 0.0) as f64;
            assert!(
                (sum - want_sum).abs() <= 1e-5 * want_sum,
                "{name}: sum {sum} vs {want_sum}"
            );
        }
    }

    #[test]
    fn max_and_scale_agree_with_scalar_code_on_odd_lengths() {
        for len in [0usize, 1, 15, 16, 17, 33, 1000] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            let want = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            for (name, level) in variants() {
                assert_eq!(run_max(level, &row), want, "{name}, len {len}");
            }
            let mut scaled = row.clone();
            scale(&mut scaled, 0.5);
            assert!(scaled.iter().zip(&row).all(|(s, r)| *s == r * 0.5));
        }
    }
}
