//! bf16 matrix products with AVX512_BF16's `VDPBF16PS` (each of 16 f32 lanes adds the products of
//! one pair of bf16 values), for AMD Zen 4 and 5, which have AVX512_BF16 but no AMX tiles. It
//! multiplies the same packed operands as the AMX kernel in [`super::amx`] (which picks it at run
//! time), so results differ from the tiles' only in summation order.
//!
//! One `VDPBF16PS` does twice the multiply-adds of a 512-bit f32 FMA. On AMD's Zen 4 (EPYC, CPUID
//! family 25 model 17) it issues at the FMA's rate (3.45–3.65 against 3.26–3.61 G/s on one core,
//! the last line of `feinschliff bench kernels`), a gain of two: products on it reach 370–430
//! GFLOP/s on two cores against 155–207 for f32 ones on widened weights. On this project's Xeon
//! without AMX (model 207) it issues at a quarter of the FMAs' rate (1.25–1.33 against 5.0–5.4
//! G/s), so it does half their multiply-adds: 120–150 against 190–290 GFLOP/s. So it runs by
//! default on AMD only; `FEINSCHLIFF_AVX512_BF16=1` runs it on any CPU that has the instructions,
//! `=0` never (products then widen bf16 to f32).

use std::sync::OnceLock;

use super::elements::RhsPart;

/// Whether this CPU executes AVX512_BF16 instructions (checked once).
pub fn supported() -> bool {
    static SUPPORTED: OnceLock<bool> = OnceLock::new();
    *SUPPORTED.get_or_init(detect)
}

/// Whether bf16 products take this kernel where there are no AMX tiles (decided once).
pub fn preferred() -> bool {
    static PREFERRED: OnceLock<bool> = OnceLock::new();
    *PREFERRED.get_or_init(
        || match std::env::var("FEINSCHLIFF_AVX512_BF16").as_deref() {
            Ok("0") => false,
            Ok("1") => supported(),
            _ => supported() && amd(),
        },
    )
}

#[cfg(target_arch = "x86_64")]
fn detect() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> bool {
    false
}

/// Whether the CPU's vendor string is AMD's ("AuthenticAMD").
#[cfg(target_arch = "x86_64")]
fn amd() -> bool {
    let leaf = std::arch::x86_64::__cpuid(0);
    let vendor: Vec<u8> = [leaf.ebx, leaf.edx, leaf.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .collect();
    vendor == b"AuthenticAMD"
}

#[cfg(not(target_arch = "x86_64"))]
fn amd() -> bool {
    false
}

/// Rows of the left operand per register block (8 rows × 32 columns = 16 accumulators).
const ROWS: usize = 8;
/// Columns per block: two groups of 16 of the packed right operand.
const COLS: usize = 32;
/// Bytes of packed right operand kept in L2 while row blocks pass it.
const L2_BUDGET: usize = 1 << 20;

/// The output columns of `col_blocks` (blocks of 32) for all m rows, from `a` packed as bf16 rows
/// of `lda` elements (zero-padded to a multiple of 32 rows) and the `parts` of b in turn, each
/// packed in pair-interleaved groups of 16 columns ([`super::amx::PackedRhs`]).
///
/// Safety: `out` points to m rows of `ldo` ≥ n f32 that no other thread writes in these columns;
/// the parts' steps fit in `lda`; the CPU has AVX512F and AVX512_BF16 ([`supported`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
pub(crate) unsafe fn compute(
    (a, lda): (&[u16], usize),
    parts: &[RhsPart<'_>],
    (m, n): (usize, usize),
    col_blocks: std::ops::Range<usize>,
    out: *mut f32,
    ldo: usize,
) {
    use std::arch::x86_64::*;
    let kp: usize = parts.iter().map(|p| p.steps * 32).sum();
    let panel = (L2_BUDGET / (COLS * kp.max(1) * 2)).max(1);
    let mut first = col_blocks.start;
    while first < col_blocks.end {
        let panel_blocks = first..(first + panel).min(col_blocks.end);
        for row0 in (0..m).step_by(ROWS) {
            for cb in panel_blocks.clone() {
                let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
                // The pairs of k before this part, in the rows of a.
                let mut pair0 = 0;
                for part in parts {
                    let pairs = part.steps * 16;
                    // u16 per group of 16 columns: one 64-byte vector per pair of k.
                    let group = part.group_steps * 16 * 32;
                    let b0 = part.data.as_ptr().add(2 * cb * group);
                    let a_rows = a.as_ptr().add(row0 * lda).cast::<i32>().add(pair0);
                    // A block whose second group is all padding (a rank-16 factor, a last block
                    // of 16 columns) multiplies its first group only.
                    if cb * COLS + 16 < n {
                        accumulate::<2>(&mut acc, a_rows, lda, [b0, b0.add(group)], pairs);
                    } else {
                        accumulate::<1>(&mut acc, a_rows, lda, [b0], pairs);
                    }
                    pair0 += pairs;
                }
                let rows = (m - row0).min(ROWS);
                for (r, acc) in acc.iter().enumerate().take(rows) {
                    for (half, lanes) in acc.iter().enumerate() {
                        let col = cb * COLS + half * 16;
                        if col >= n {
                            break;
                        }
                        let mask = (1u32 << (n - col).min(16)) - 1;
                        _mm512_mask_storeu_ps(out.add((row0 + r) * ldo + col), mask as u16, *lanes);
                    }
                }
            }
        }
        first = panel_blocks.end;
    }
}

/// Adds `pairs` pairs of k of the `ROWS` rows at `a_rows` (rows of `lda` u16, read as i32 pairs)
/// times the first `G` groups of 16 packed columns to `acc`.
///
/// Safety: as [`compute`]'s; each group holds `pairs` vectors of 64 bytes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn accumulate<const G: usize>(
    acc: &mut [[std::arch::x86_64::__m512; 2]; ROWS],
    a_rows: *const i32,
    lda: usize,
    groups: [*const u16; G],
    pairs: usize,
) {
    use std::arch::x86_64::*;
    for p in 0..pairs {
        let vb: [__m512bh; G] =
            groups.map(|g| std::mem::transmute(_mm512_loadu_si512(g.add(p * 32).cast())));
        for (r, acc) in acc.iter_mut().enumerate() {
            let pair = a_rows.add(r * lda / 2 + p).read_unaligned();
            let va: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (acc, vb) in acc.iter_mut().zip(vb) {
                *acc = _mm512_dpbf16_ps(*acc, va, vb);
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
pub(crate) unsafe fn compute(
    _: (&[u16], usize),
    _: &[RhsPart<'_>],
    _: (usize, usize),
    _: std::ops::Range<usize>,
    _: *mut f32,
    _: usize,
) {
    unreachable!("AVX512_BF16 is never available off x86-64")
}
