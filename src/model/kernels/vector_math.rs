//! Vectorised row kernels on the CPU: for the softmaxes (LM head, attention, eval's
//! log-probabilities) the maximum of a row, exp(x − shift) in place with the sum, and scaling;
//! SiLU·up and its gradients; f32 → bf16 rounding of the bf16 kernels' operands; decoding's dot
//! products of a few rows against a weight row, the weight prefetched ahead. The exponential is a
//! polynomial (Cephes' `expf`, within 2 ulp of the libm one), written as plain lane-wise
//! arithmetic so the compiler vectorises it; each kernel is compiled for AVX-512 and for AVX2+FMA
//! as well as for the baseline, and the best one the CPU has is chosen at run time.

use std::mem::MaybeUninit;
use std::sync::OnceLock;

/// Defines a public kernel from a body of plain lane-wise code: the body is compiled for AVX-512
/// and for AVX2+FMA as well as for the baseline, and each call runs the best variant this CPU has.
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                body($($arg),*)
            }

            match level() {
                // SAFETY: `level` reports only instruction sets this CPU has.
                #[cfg(target_arch = "x86_64")]
                Level::Avx512 => unsafe { avx512($($arg),*) },
                #[cfg(target_arch = "x86_64")]
                Level::Avx2 => unsafe { avx2($($arg),*) },
                Level::Baseline => body($($arg),*),
            }
        }
    };
}

multiversion! {
    /// The largest element of `row` (−∞ when empty; NaNs are skipped as `f32::max` does).
    pub fn max(row: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (a, v) in acc.iter_mut().zip(chunk) {
                *a = a.max(*v);
            }
        }
        let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
        acc.iter().fold(tail, |m, v| m.max(*v))
    }
}

multiversion! {
    /// Replaces each x of `row` with exp(x − shift) and returns their sum.
    pub fn exp_shifted_sum(row: &mut [f32], shift: f32) -> f32 {
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
}

/// A softmax's passes over one row in the CPU kernels' element types: vectorised in f32, plain
/// loops in f64 (an f64 model's reference precision).
pub trait SoftmaxRow: Sized {
    /// The largest element of a row.
    fn row_max(row: &[Self]) -> Self;
    /// Replaces each x of `row` with exp(x − shift) and returns their sum.
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self;
}

impl SoftmaxRow for f32 {
    fn row_max(row: &[Self]) -> Self {
        max(row)
    }
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self {
        exp_shifted_sum(row, shift)
    }
}

impl SoftmaxRow for f64 {
    fn row_max(row: &[Self]) -> Self {
        row.iter().fold(f64::NEG_INFINITY, |m, v| m.max(*v))
    }
    fn exp_shifted_sum(row: &mut [Self], shift: Self) -> Self {
        row.iter_mut()
            .map(|v| {
                *v = (*v - shift).exp();
                *v
            })
            .sum()
    }
}

multiversion! {
    /// Multiplies each element of `row` by `factor`.
    pub fn scale(row: &mut [f32], factor: f32) {
        row.iter_mut().for_each(|v| *v *= factor);
    }
}

/// The bits of f32 → bf16 rounding to nearest even (NaN stays NaN): a select instead of a branch, so that loops over it vectorise.
#[inline(always)]
pub(crate) fn bf16_bits(f: f32) -> u16 {
    let bits = f.to_bits();
    let quiet_nan = (bits >> 16) | 0x40;
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16;
    (if f.is_nan() { quiet_nan } else { rounded }) as u16
}

multiversion! {
    /// Each element of `src` rounded to bf16 (nearest, ties to even; NaNs stay NaN), as bits
    /// into `dst` (the bf16 kernels' operands).
    pub fn round_to_bf16(src: &[f32], dst: &mut [MaybeUninit<u16>]) {
        for (d, s) in dst.iter_mut().zip(src) {
            d.write(bf16_bits(*s));
        }
    }
}

multiversion! {
    /// Each x of `row` as x·scale + mask (the mask's element at the same index), in place;
    /// returns the largest (a row of attention scores before its softmax).
    pub fn scale_add_max(row: &mut [f32], scale: f32, mask: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        let mut masks = mask.chunks_exact(LANES);
        for (chunk, m) in (&mut chunks).zip(&mut masks) {
            for ((a, v), m) in acc.iter_mut().zip(chunk.iter_mut()).zip(m) {
                *v = *v * scale + *m;
                *a = a.max(*v);
            }
        }
        let mut tail = f32::NEG_INFINITY;
        for (v, m) in chunks.into_remainder().iter_mut().zip(masks.remainder()) {
            *v = *v * scale + *m;
            tail = tail.max(*v);
        }
        acc.iter().fold(tail, |m, v| m.max(*v))
    }
}

multiversion! {
    /// exp(x − shift) of each x of `row`, rounded to bf16, as bits into `dst`; returns the sum of
    /// the unrounded values (unnormalised attention probabilities as a bf16 operand).
    pub fn exp_shifted_bf16(row: &[f32], shift: f32, dst: &mut [MaybeUninit<u16>]) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact(LANES);
        let mut outs = dst.chunks_exact_mut(LANES);
        for (chunk, out) in (&mut chunks).zip(&mut outs) {
            for ((a, v), d) in acc.iter_mut().zip(chunk).zip(out.iter_mut()) {
                let e = exp_lane(*v - shift);
                d.write(bf16_bits(e));
                *a += e;
            }
        }
        let mut tail = 0f32;
        for (v, d) in chunks.remainder().iter().zip(outs.into_remainder()) {
            let e = exp_lane(*v - shift);
            d.write(bf16_bits(e));
            tail += e;
        }
        acc.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// x_i·w for each row x_i of `x` (`out.len()` rows of w.len() elements, one after another)
    /// into `out`: per row, 16 partial sums added in lane order, then the tail. A few rows
    /// against a weight's row; the rows' sums run side by side, so that none waits on its own
    /// previous addition.
    pub fn dots(x: &[f32], w: &[f32], out: &mut [f32]) {
        lane_dots(x, w, out, |v| v)
    }
}

multiversion! {
    /// [`dots`] for a bf16 w, each element widened exactly (its bits are an f32's upper half).
    pub fn dots_bf16(x: &[f32], w: &[half::bf16], out: &mut [f32]) {
        lane_dots(x, w, out, |v| f32::from_bits(u32::from(v.to_bits()) << 16))
    }
}

/// [`dots`] with w widened by `widen` (inlined into the kernels above, and the baseline for other
/// weight types): up to eight rows at once, more one by one.
#[inline(always)]
pub(crate) fn lane_dots<W: Copy>(
    x: &[f32],
    w: &[W],
    out: &mut [f32],
    widen: impl Fn(W) -> f32 + Copy,
) {
    match out.len() {
        1 => rows_dots::<1, W>(x, w, out, widen),
        2 => rows_dots::<2, W>(x, w, out, widen),
        3 => rows_dots::<3, W>(x, w, out, widen),
        4 => rows_dots::<4, W>(x, w, out, widen),
        5 => rows_dots::<5, W>(x, w, out, widen),
        6 => rows_dots::<6, W>(x, w, out, widen),
        7 => rows_dots::<7, W>(x, w, out, widen),
        8 => rows_dots::<8, W>(x, w, out, widen),
        _ => {
            for (row, o) in x.chunks(w.len().max(1)).zip(out.iter_mut()) {
                rows_dots::<1, W>(row, w, std::slice::from_mut(o), widen);
            }
        }
    }
}

/// Weight elements ahead of the ones being summed that [`rows_dots`] asks the CPU to fetch. With
/// eight rows there are ~25 instructions per cache line of the weight, and the out-of-order
/// window alone keeps too few lines in flight to stream the weight at the memory's rate: smol
/// generation at batch 8 ran at 109 tokens/s without, 150 with 256 elements ahead, 158–162 with
/// 512 or 1,024, 146 with 4,096 (batch 1: 32–34 → 37–38).
const PREFETCH_AHEAD: usize = 1024;

/// Asks the CPU to bring the cache line at `at` into L1 (a hint: any address is allowed, none
/// faults).
#[inline(always)]
fn prefetch<T>(at: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing architecturally and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(at.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = at;
}

/// The sums of [`dots`] for exactly `M` rows.
#[inline(always)]
fn rows_dots<const M: usize, W: Copy>(
    x: &[f32],
    w: &[W],
    out: &mut [f32],
    widen: impl Fn(W) -> f32,
) {
    let k = w.len();
    let full = k / 16 * 16;
    let mut lanes = [[0f32; 16]; M];
    let mut ws = [0f32; 16];
    for c in (0..full).step_by(16) {
        prefetch(w.as_ptr().wrapping_add(c + PREFETCH_AHEAD));
        for (v, w) in ws.iter_mut().zip(&w[c..c + 16]) {
            *v = widen(*w);
        }
        for (i, acc) in lanes.iter_mut().enumerate() {
            let xs = &x[i * k + c..i * k + c + 16];
            for l in 0..16 {
                acc[l] += xs[l] * ws[l];
            }
        }
    }
    for (i, (o, acc)) in out.iter_mut().zip(&lanes).enumerate() {
        let row = &x[i * k..(i + 1) * k];
        let tail: f32 = row[full..]
            .iter()
            .zip(&w[full..])
            .map(|(x, w)| x * widen(*w))
            .sum();
        *o = acc.iter().sum::<f32>() + tail;
    }
}

multiversion! {
    /// One row of RMSNorm: out = x·r·w with r = 1/√(mean(x²) + eps), the sum of squares and the
    /// products in f64 (the sum in eight lanes).
    pub fn rms_norm_row(x: &[f32], w: &[f32], eps: f64, out: &mut [MaybeUninit<f32>]) {
        let r = 1.0 / (squares_f64(x) / w.len() as f64 + eps).sqrt();
        for ((o, v), w) in out.iter_mut().zip(x).zip(w) {
            o.write((*v as f64 * r * *w as f64) as f32);
        }
    }
}

multiversion! {
    /// One row of RMSNorm's input gradient for the output gradient g:
    /// r·(g⊙w − x·r²·mean(g⊙w⊙x)), in f64 as [`rms_norm_row`].
    pub fn rms_norm_backward_row(
        x: &[f32],
        w: &[f32],
        g: &[f32],
        eps: f64,
        out: &mut [MaybeUninit<f32>]
    ) {
        let mut gwx = [0f64; F64_LANES];
        let (xs, gs, ws) = (x.chunks_exact(F64_LANES), g.chunks_exact(F64_LANES), w.chunks_exact(F64_LANES));
        let tail = (xs.remainder(), gs.remainder(), ws.remainder());
        for ((xc, gc), wc) in xs.zip(gs).zip(ws) {
            for (((a, v), gv), wv) in gwx.iter_mut().zip(xc).zip(gc).zip(wc) {
                *a += *gv as f64 * *wv as f64 * *v as f64;
            }
        }
        let mut gwx_sum: f64 = gwx.iter().sum();
        for ((v, gv), wv) in tail.0.iter().zip(tail.1).zip(tail.2) {
            gwx_sum += *gv as f64 * *wv as f64 * *v as f64;
        }
        let hidden = w.len() as f64;
        let r = 1.0 / (squares_f64(x) / hidden + eps).sqrt();
        let c = r * r * gwx_sum / hidden;
        for (((o, v), gv), wv) in out.iter_mut().zip(x).zip(g).zip(w) {
            o.write((r * (*gv as f64 * *wv as f64 - *v as f64 * c)) as f32);
        }
    }
}

/// f64 lanes of the RMSNorm sums (one AVX-512 register).
const F64_LANES: usize = 8;

/// Σ x² in f64, in [`F64_LANES`] independent sums (inlined into the kernels above).
#[inline(always)]
fn squares_f64(x: &[f32]) -> f64 {
    let mut acc = [0f64; F64_LANES];
    let mut chunks = x.chunks_exact(F64_LANES);
    for chunk in &mut chunks {
        for (a, v) in acc.iter_mut().zip(chunk) {
            *a += *v as f64 * *v as f64;
        }
    }
    let tail: f64 = chunks
        .remainder()
        .iter()
        .map(|v| *v as f64 * *v as f64)
        .sum();
    acc.iter().sum::<f64>() + tail
}

multiversion! {
    /// out = SiLU(gate)·up = gate / (1 + e^−gate) · up, element by element.
    pub fn silu_mul(gate: &[f32], up: &[f32], out: &mut [MaybeUninit<f32>]) {
        for ((o, g), u) in out.iter_mut().zip(gate).zip(up) {
            o.write(*g / (1.0 + exp_lane(-*g)) * *u);
        }
    }
}

multiversion! {
    /// The gradients of [`silu_mul`] for the output gradient `grad`: with s = σ(gate),
    /// d_up = grad·gate·s and d_gate = grad·up·s·(1 + gate·(1 − s)).
    pub fn silu_mul_backward(
        gate: &[f32],
        up: &[f32],
        grad: &[f32],
        d_gate: &mut [MaybeUninit<f32>],
        d_up: &mut [MaybeUninit<f32>]
    ) {
        let inputs = gate.iter().zip(up).zip(grad);
        for ((dg, du), ((g, u), gr)) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(inputs) {
            let s = 1.0 / (1.0 + exp_lane(-*g));
            du.write(*gr * *g * s);
            dg.write(*gr * *u * (s * (1.0 + *g * (1.0 - s))));
        }
    }
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

/// The instruction set the kernels here run on this CPU, in words.
pub fn instruction_set() -> &'static str {
    match level() {
        #[cfg(target_arch = "x86_64")]
        Level::Avx512 => "AVX-512",
        #[cfg(target_arch = "x86_64")]
        Level::Avx2 => "AVX2+FMA",
        Level::Baseline => "baseline vector instructions",
    }
}

fn level() -> Level {
    #[cfg(test)]
    if let Some(forced) = tests::FORCED.with(|f| f.get()) {
        return forced;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    thread_local! {
        /// The variant the kernels run on this thread (tests only; None: the detected one).
        pub(super) static FORCED: Cell<Option<Level>> = const { Cell::new(None) };
    }

    /// Runs `f` once on every compiled variant this CPU can run, with the variant's name.
    fn on_every_variant(mut f: impl FnMut(&str)) {
        let mut variants = vec![("baseline", Level::Baseline)];
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                variants.push(("avx2", Level::Avx2));
            }
            if is_x86_feature_detected!("avx512f") {
                variants.push(("avx512", Level::Avx512));
            }
        }
        for (name, level) in variants {
            FORCED.with(|forced| forced.set(Some(level)));
            f(name);
        }
        FORCED.with(|forced| forced.set(None));
    }

    fn ulps(a: f32, b: f32) -> i64 {
        (a.to_bits() as i64 - b.to_bits() as i64).abs()
    }

    #[test]
    fn bf16_rounding_equals_half_on_every_variant() {
        // Ties both ways, the largest finite values (which round to infinity), subnormals,
        // infinities, NaNs with payloads, and a sweep of ordinary values.
        let specials = [
            0.0f32,
            -0.0,
            1.0 + f32::EPSILON * 64.0,
            1.0 + f32::EPSILON * 192.0,
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            f32::from_bits(0x8000_7fff),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::from_bits(0x7f80_0001),
            f32::from_bits(0xff80_8000),
        ];
        let xs: Vec<f32> = (0..100_003u32)
            .map(|i| f32::from_bits(i.wrapping_mul(2_654_435_761)))
            .chain(specials)
            .collect();
        on_every_variant(|name| {
            let mut got = vec![MaybeUninit::new(0u16); xs.len()];
            round_to_bf16(&xs, &mut got);
            for (x, g) in xs.iter().zip(&got) {
                // SAFETY: every element was written above.
                let g = unsafe { g.assume_init() };
                let want = half::bf16::from_f32(*x);
                if want.is_nan() {
                    assert!(
                        half::bf16::from_bits(g).is_nan(),
                        "{name}: {x:e} gave {g:#06x}"
                    );
                } else {
                    assert_eq!(g, want.to_bits(), "{name}: {x:e}");
                }
            }
        });
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_exact_at_the_ends() {
        let xs: Vec<f32> = (0..200_003)
            .map(|i| -90.0 + 180.0 * i as f32 / 200_000.0)
            .chain([0.0, -0.0, 1.0, f32::NEG_INFINITY, f32::MIN, -1e30, 1e-30])
            .collect();
        on_every_variant(|name| {
            let mut got = xs.clone();
            exp_shifted_sum(&mut got, 0.0);
            for (x, g) in xs.iter().zip(&got) {
                if *x < EXP_LOW {
                    assert_eq!(*g, 0.0, "{name}: exp({x})");
                } else if *x > EXP_HIGH {
                    assert_eq!(*g, f32::INFINITY, "{name}: exp({x})");
                } else {
                    let want = x.exp();
                    assert!(ulps(*g, want) <= 2, "{name}: exp({x}) = {g}, libm {want}");
                }
            }
            let mut shifted: Vec<f32> = xs.iter().map(|x| x.min(0.0)).collect();
            let want: f64 = shifted.iter().map(|x| (*x as f64).exp()).sum();
            let sum = exp_shifted_sum(&mut shifted, 0.0) as f64;
            assert!(
                (sum - want).abs() <= 1e-5 * want,
                "{name}: sum {sum} vs {want}"
            );
        });
    }

    #[test]
    fn max_and_scale_agree_with_scalar_code_on_odd_lengths() {
        for len in [0usize, 1, 15, 16, 17, 33, 1000] {
            let row: Vec<f32> = (0..len).map(|i| ((i * 7919) % 101) as f32 - 50.0).collect();
            let want = row.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            on_every_variant(|name| {
                assert_eq!(max(&row), want, "{name}, len {len}");
                let mut scaled = row.clone();
                scale(&mut scaled, 0.5);
                assert!(
                    scaled.iter().zip(&row).all(|(s, r)| *s == r * 0.5),
                    "{name}"
                );
            });
        }
    }

    #[test]
    fn attention_rows_scale_mask_and_round_as_their_scalar_steps_do() {
        for len in [0usize, 1, 15, 16, 17, 33, 1000] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 5.0)
                .collect();
            let mask: Vec<f32> = (0..len)
                .map(|i| if i % 5 == 4 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let scaled: Vec<f32> = row.iter().zip(&mask).map(|(x, m)| x * 0.125 + m).collect();
            let want_max = scaled.iter().fold(f32::NEG_INFINITY, |m, v| m.max(*v));
            on_every_variant(|name| {
                let mut got = row.clone();
                assert_eq!(
                    scale_add_max(&mut got, 0.125, &mask),
                    want_max,
                    "{name}, {len}"
                );
                assert_eq!(got, scaled, "{name}, len {len}");
                let mut exps = scaled.clone();
                let want_sum = exp_shifted_sum(&mut exps, want_max);
                let mut bits = vec![MaybeUninit::new(0u16); len];
                let sum = exp_shifted_bf16(&scaled, want_max, &mut bits);
                assert!(
                    (sum - want_sum).abs() <= 1e-5 * want_sum.max(1.0),
                    "{name}, {len}"
                );
                for (b, e) in bits.iter().zip(&exps) {
                    // SAFETY: every element was written above.
                    assert_eq!(unsafe { b.assume_init() }, bf16_bits(*e), "{name}, {len}");
                }
            });
        }
    }

    #[test]
    fn silu_mul_and_its_gradients_agree_with_f64_formulas() {
        let n = 1003;
        let gate: Vec<f32> = (0..n).map(|i| (i as f32 - 500.0) * 0.05).collect();
        let up: Vec<f32> = (0..n).map(|i| ((i * 37) % 17) as f32 * 0.3 - 2.0).collect();
        let grad: Vec<f32> = (0..n).map(|i| ((i * 13) % 7) as f32 * 0.5 - 1.5).collect();
        on_every_variant(|name| {
            let zeros = || vec![MaybeUninit::new(0f32); n];
            let (mut out, mut dg, mut du) = (zeros(), zeros(), zeros());
            silu_mul(&gate, &up, &mut out);
            silu_mul_backward(&gate, &up, &grad, &mut dg, &mut du);
            let [out, dg, du] = [out, dg, du].map(written);
            for i in 0..n {
                let (g, u, gr) = (gate[i] as f64, up[i] as f64, grad[i] as f64);
                let s = 1.0 / (1.0 + (-g).exp());
                let close =
                    |got: f32, want: f64| (got as f64 - want).abs() <= 1e-6 * want.abs().max(1.0);
                assert!(close(out[i], g * s * u), "{name}: silu·up at {g}");
                assert!(close(du[i], gr * g * s), "{name}: d_up at {g}");
                assert!(
                    close(dg[i], gr * u * s * (1.0 + g * (1.0 - s))),
                    "{name}: d_gate at {g}"
                );
            }
        });
    }

    /// The elements of a buffer the kernel under test wrote whole.
    fn written(v: Vec<MaybeUninit<f32>>) -> Vec<f32> {
        // SAFETY: the tests start from zeroed buffers, so every element is initialised.
        v.into_iter().map(|x| unsafe { x.assume_init() }).collect()
    }

    #[test]
    fn rms_norm_rows_agree_with_f64_formulas() {
        for hidden in [1, 7, 8, 64, 577] {
            let x: Vec<f32> = (0..hidden)
                .map(|i| ((i * 29) % 23) as f32 * 0.1 - 1.1)
                .collect();
            let w: Vec<f32> = (0..hidden)
                .map(|i| 1.0 + ((i * 7) % 5) as f32 * 0.05)
                .collect();
            let g: Vec<f32> = (0..hidden)
                .map(|i| ((i * 11) % 13) as f32 * 0.2 - 1.2)
                .collect();
            let eps = 1e-6;
            let (x64, w64, g64) = [&x, &w, &g]
                .map(|v| v.iter().map(|a| *a as f64).collect::<Vec<_>>())
                .into();
            let h = hidden as f64;
            let r = 1.0 / (x64.iter().map(|v| v * v).sum::<f64>() / h + eps).sqrt();
            let c = r * r * (0..hidden).map(|i| g64[i] * w64[i] * x64[i]).sum::<f64>() / h;
            on_every_variant(|name| {
                let (mut y, mut dx) = (
                    vec![MaybeUninit::new(0f32); hidden],
                    vec![MaybeUninit::new(0f32); hidden],
                );
                rms_norm_row(&x, &w, eps, &mut y);
                rms_norm_backward_row(&x, &w, &g, eps, &mut dx);
                let (y, dx) = (written(y), written(dx));
                for i in 0..hidden {
                    let want_y = (x64[i] * r * w64[i]) as f32;
                    let want_dx = (r * (g64[i] * w64[i] - x64[i] * c)) as f32;
                    assert!(
                        (y[i] - want_y).abs() <= 1e-6 * want_y.abs().max(1.0),
                        "{name}: y[{i}] of {hidden}"
                    );
                    assert!(
                        (dx[i] - want_dx).abs() <= 1e-6 * want_dx.abs().max(1.0),
                        "{name}: dx[{i}] of {hidden}"
                    );
                }
            });
        }
    }

    #[test]
    fn dots_give_the_same_bits_on_every_variant() {
        for len in [0, 5, 16, 577] {
            let w: Vec<f32> = (0..len)
                .map(|i| ((i * 7) % 23) as f32 * 0.11 - 1.3)
                .collect();
            let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
            for rows in [1, 3, 8, 9] {
                let x: Vec<f32> = (0..rows * len)
                    .map(|i| ((i * 31) % 19) as f32 * 0.37 - 3.1)
                    .collect();
                let mut results = Vec::new();
                on_every_variant(|name| {
                    let (mut f32s, mut bf16s) = (vec![0f32; rows], vec![0f32; rows]);
                    dots(&x, &w, &mut f32s);
                    dots_bf16(&x, &wb, &mut bf16s);
                    // Each row alone gives the bits it gives among the others.
                    for (r, row) in x.chunks(len.max(1)).enumerate().take(rows) {
                        let (mut one, mut one_bf16) = ([0f32], [0f32]);
                        dots(row, &w, &mut one);
                        dots_bf16(row, &wb, &mut one_bf16);
                        assert_eq!(one[0].to_bits(), f32s[r].to_bits(), "{name}: row {r}");
                        assert_eq!(one_bf16[0].to_bits(), bf16s[r].to_bits(), "{name}: row {r}");
                    }
                    results.push((name.to_string(), f32s, bf16s))
                });
                let (_, want, want_bf16) = results[0].clone();
                for (name, got, got_bf16) in &results {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(got), bits(&want), "{name}: dots of {rows} × {len}");
                    assert_eq!(
                        bits(got_bf16),
                        bits(&want_bf16),
                        "{name}: bf16 dots of {rows} × {len}"
                    );
                }
            }
        }
    }
}
