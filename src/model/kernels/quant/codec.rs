//! One block of quantised values, encoded and decoded: llama.cpp's Q4_0 and Q8_0 exactly as gguf-py
//! (`gguf.quants.quantize`) computes them, and bitsandbytes' NF4 exactly as its `quantize_4bit`
//! does (absmax per block, values bucketed by the midpoints of the code book).
//!
//! A block keeps one scale (as f32 here; Q4_0 and Q8_0 store it as f16) and one code per value:
//! 4-bit codes two to a byte with the first value in the high nibble (bitsandbytes' packing),
//! 8-bit codes offset by 128 so that a byte holds them. A value decodes as `table[code] · scale`
//! (Q4_0: code − 8; NF4: the code book) or `(code − 128) · scale` (Q8_0); [`super::panels`]
//! decodes blocks, [`super::QuantizedWeight::dequantize`] whole weights with candle ops.

use super::format::Quantization;

/// bitsandbytes' NF4 code book (`_NF4_QUANT_TABLE`): the quantiles of a normal distribution,
/// scaled to [-1, 1], with an exact zero.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Q4_0's values: code − 8.
pub const Q4_0_CODE: [f32; 16] = [
    -8.0, -7.0, -6.0, -5.0, -4.0, -3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0,
];

/// The offset of Q8_0's signed codes in their bytes.
pub const Q8_BIAS: f32 = 128.0;

/// Encodes one block `x` (`format.block()` values) into `codes` (its bytes) and returns the
/// scale, already rounded to f16 where the format stores it so.
pub fn encode(format: Quantization, x: &[f32], codes: &mut [u8]) -> f32 {
    match format {
        Quantization::Q4_0 => encode_q4_0(x, codes),
        Quantization::Q8_0 => encode_q8_0(x, codes),
        Quantization::Nf4 => encode_nf4(x, codes),
    }
}

/// gguf-py's Q4_0: d = (the value of largest magnitude) / −8, code = trunc(x / d + 8.5) in f32,
/// clipped to 15.
fn encode_q4_0(x: &[f32], codes: &mut [u8]) -> f32 {
    let mut max = 0f32;
    for &v in x {
        if v.abs() > max.abs() {
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    let code = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
    pack_nibbles(x, codes, code);
    half::f16::from_f32(d).to_f32()
}

/// gguf-py's Q8_0: d = max |x| / 127, code = x / d rounded half away from zero.
fn encode_q8_0(x: &[f32], codes: &mut [u8]) -> f32 {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d == 0.0 { 0.0 } else { 1.0 / d };
    for (c, &v) in codes.iter_mut().zip(x) {
        *c = ((v * id).round() + Q8_BIAS) as u8;
    }
    half::f16::from_f32(d).to_f32()
}

/// bitsandbytes' NF4: absmax per block; x / absmax (as x · (1 / absmax), clamped to [-1, 1]) takes
/// the code whose interval between midpoints of the code book holds it, the lower one on a midpoint.
fn encode_nf4(x: &[f32], codes: &mut [u8]) -> f32 {
    let absmax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let inv = 1.0 / absmax.max(1e-38);
    let bounds = nf4_midpoints();
    let code = |v: f32| {
        let scaled = (v * inv).clamp(-1.0, 1.0);
        bounds.iter().filter(|&&b| b < scaled).count() as u8
    };
    pack_nibbles(x, codes, code);
    absmax
}

/// The midpoints of neighbouring NF4 code values, computed in f32 as bitsandbytes does.
fn nf4_midpoints() -> [f32; 15] {
    std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0)
}

/// Two 4-bit codes per byte, the first in the high nibble.
fn pack_nibbles(x: &[f32], codes: &mut [u8], code: impl Fn(f32) -> u8) {
    for (c, pair) in codes.iter_mut().zip(x.chunks_exact(2)) {
        *c = (code(pair[0]) << 4) | code(pair[1]);
    }
}

/// The values of a 4-bit format's codes (None for Q8_0, whose value is [`q8_0_value`]).
#[inline]
pub fn table(format: Quantization) -> Option<&'static [f32; 16]> {
    match format {
        Quantization::Q4_0 => Some(&Q4_0_CODE),
        Quantization::Nf4 => Some(&NF4_CODE),
        Quantization::Q8_0 => None,
    }
}

/// The two values each of the 256 bytes of a 4-bit format's codes stands for before its block's
/// scale, as [256 × 2] row-major, the high nibble's first; None for Q8_0 (code − [`Q8_BIAS`]).
pub fn byte_pairs(format: Quantization) -> Option<Vec<f32>> {
    table(format).map(|values| {
        (0..=255u8)
            .flat_map(|b| [values[usize::from(b >> 4)], values[usize::from(b & 15)]])
            .collect()
    })
}

/// The value of a Q8_0 code in a block of scale `scale`.
#[inline]
pub fn q8_0_value(code: u8, scale: f32) -> f32 {
    (f32::from(code) - Q8_BIAS) * scale
}

/// A Q4_0 or Q8_0 block as a GGUF file stores it (f16 d, then codes; Q4_0: value i in the low
/// nibble of byte i, value i + 16 in its high nibble; Q8_0: signed bytes) into `codes` in this
/// module's layout; returns the scale. GGUF has no NF4 blocks.
pub fn from_gguf(format: Quantization, block: &[u8], codes: &mut [u8]) -> f32 {
    let d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
    let qs = &block[2..];
    match format {
        Quantization::Q4_0 => {
            let value = |i: usize| {
                let byte = qs[i % 16];
                if i < 16 {
                    byte & 15
                } else {
                    byte >> 4
                }
            };
            for (j, c) in codes.iter_mut().enumerate() {
                *c = (value(2 * j) << 4) | value(2 * j + 1);
            }
        }
        Quantization::Q8_0 => {
            for (c, &q) in codes.iter_mut().zip(qs) {
                *c = q ^ 0x80;
            }
        }
        Quantization::Nf4 => unreachable!("GGUF files hold no NF4 blocks"),
    }
    d
}
