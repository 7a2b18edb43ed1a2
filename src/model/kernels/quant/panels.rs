//! Products with a quantized weight on the CPU, a panel at a time: each thread decodes a panel of
//! the weight (at most 256 of the product's output columns) into a scratch buffer and multiplies
//! it there with the kernels dense weights use — the bf16 kernel (AMX tiles or AVX512_BF16, the
//! left operand packed once for all panels) where the compute dtype is bf16 and a dense bf16
//! weight would take it, else faer in f32 on the values rounded to the compute dtype. So a product
//! is that of the dense weight of the decoded values, and memory holds the quantized weight plus
//! one panel per thread.

use std::ops::Range;

use candle_core::DType;
use faer::{Accum, MatMut, Par};
use half::f16;
use rayon::prelude::*;

use super::super::amx::{self, SendPtr};
use super::super::elements::{assume_init, narrow_bf16, uninit, RhsPart, Strided};
use super::super::low_rank::{Factors, LowRank};
use super::super::matmul::{view, weight_kernel, PARALLEL_FLOPS};
use super::codec;
use super::format::Quantization;

/// Which product with W [rows, cols]: a·Wᵀ (the forward pass; its output columns are the rows
/// of W) or a·W (the input gradient; its output columns are the columns of W).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Orientation {
    Transposed,
    Plain,
}

/// The planes of a quantized weight as CPU slices (see [`super::QuantizedWeight`]).
pub struct Planes<'a> {
    pub format: Quantization,
    pub dims: (usize, usize),
    pub codes: &'a [u8],
    pub scales: Scales<'a>,
}

/// The scales of a plane: f16 (Q4_0, Q8_0) or f32 (NF4).
pub enum Scales<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

/// Most output columns one panel covers.
const MAX_PANEL: usize = 256;

impl Planes<'_> {
    /// Calls `put(i, value)` for the values of block `b` in order, each `convert`ed from f32;
    /// 4-bit codes convert their 16 scaled code values once per block.
    #[inline(always)]
    fn block<T: Copy>(
        &self,
        b: usize,
        convert: impl Fn(f32) -> T + Copy,
        mut put: impl FnMut(usize, T),
    ) {
        let bytes = self.format.code_bytes();
        let codes = &self.codes[b * bytes..(b + 1) * bytes];
        let scale = match self.scales {
            // Inlined (half's to_f32 is a call that checks for F16C each time).
            Scales::F16(s) => s[b].to_f32_const(),
            Scales::F32(s) => s[b],
        };
        match codec::table(self.format) {
            Some(table) => {
                let values: [T; 16] = std::array::from_fn(|q| convert(table[q] * scale));
                for (j, &c) in codes.iter().enumerate() {
                    put(2 * j, values[usize::from(c >> 4)]);
                    put(2 * j + 1, values[usize::from(c & 15)]);
                }
            }
            None => {
                for (i, &c) in codes.iter().enumerate() {
                    put(i, convert(codec::q8_0_value(c, scale)));
                }
            }
        }
    }

    /// The right operand's columns `cols` (of Wᵀ, or of W) as f32 [k, cols.len()] rounded by
    /// `round`, with Wᵀ's columns or W's rows contiguous: rows of W are decoded whole into Wᵀ's
    /// columns; of W, each row's blocks that the columns cover.
    #[inline(always)]
    fn fill_f32(
        &self,
        orientation: Orientation,
        cols: Range<usize>,
        round: fn(f32) -> f32,
        out: &mut [f32],
    ) {
        let (rows, width) = self.dims;
        let block = self.format.block();
        let per_row = width / block;
        let p = cols.len();
        match orientation {
            Orientation::Transposed => {
                for (col, r) in cols.enumerate() {
                    let dst = &mut out[col * width..(col + 1) * width];
                    for b in 0..per_row {
                        let k0 = b * block;
                        self.block(r * per_row + b, round, |i, v| dst[k0 + i] = v);
                    }
                }
            }
            Orientation::Plain => {
                let first = cols.start / block;
                for r in 0..rows {
                    let dst = &mut out[r * p..(r + 1) * p];
                    for b in first..cols.end / block {
                        let c0 = (b - first) * block;
                        self.block(r * per_row + b, round, |i, v| dst[c0 + i] = v);
                    }
                }
            }
        }
    }

    /// The right operand's columns `cols` (of Wᵀ, or of W) as bf16 bits, packed for the bf16
    /// kernels with `kp` rows ([`amx::packed_index`]): a value's place steps by 32 per pair of
    /// rows and by one group (kp·16) per 16 columns.
    #[inline(always)]
    fn fill_packed(
        &self,
        orientation: Orientation,
        cols: Range<usize>,
        kp: usize,
        out: &mut [u16],
    ) {
        let (rows, width) = self.dims;
        let block = self.format.block();
        let per_row = width / block;
        let bits = |v: f32| narrow_bf16(v).to_bits();
        match orientation {
            Orientation::Transposed => {
                for (col, r) in cols.enumerate() {
                    let column = amx::packed_index(0, col, kp);
                    for b in 0..per_row {
                        // Row k0 = b·block starts at k0·16 (whole steps of 32 rows).
                        let start = column + b * block * 16;
                        self.block(r * per_row + b, bits, |i, v| {
                            out[start + (i / 2) * 32 + i % 2] = v
                        });
                    }
                }
            }
            Orientation::Plain => {
                let first = cols.start / block;
                for kk in 0..rows {
                    let row = amx::packed_index(kk, 0, kp);
                    for b in first..cols.end / block {
                        // Column c0 = (b − first)·block starts a group (c0 is a multiple of 32).
                        let start = row + (b - first) * block / 16 * kp * 16;
                        self.block(kk * per_row + b, bits, |i, v| {
                            out[start + (i / 16) * kp * 16 + (i % 16) * 2] = v
                        });
                    }
                }
            }
        }
    }
}

/// a [m, k] · B with B = Wᵀ ([`Orientation::Transposed`]) or W ([`Orientation::Plain`]), as f32
/// [m, n], the decoded values rounded to `compute`.
pub fn product(w: &Planes, orientation: Orientation, compute: DType, a: Strided<f32>) -> Vec<f32> {
    let (k, n) = w.product_dims(orientation);
    let m = a.rows;
    if let Some(kernel) = w.bf16_kernel(orientation, compute, m) {
        let kp = k.next_multiple_of(32);
        let rows = amx::pack_rows(&a, kp);
        return w.tile_panels(orientation, kernel, (m, n), (&rows, kp), None);
    }
    let mut out = uninit::<f32>(m * n);
    let dst = SendPtr(out.as_mut_ptr().cast::<f32>());
    let (panels, parallel) = w.panels(orientation, m);
    let round = rounding(compute);
    let lhs = view(a.data, a.offset, m, k, a.strides);
    for_each(parallel, &panels, |cols| {
        let p = cols.len();
        let mut values = vec![0f32; k * p];
        w.fill_f32(orientation, cols.clone(), round, &mut values);
        // Wᵀ's columns are contiguous (rows of W decoded whole), W's rows.
        let strides = match orientation {
            Orientation::Transposed => (1, k),
            Orientation::Plain => (p, 1),
        };
        let rhs = view(&values, 0, k, p, strides);
        // SAFETY: columns cols of the m × n output, written by this panel only; faer
        // writes them all without reading (Replace).
        let out = unsafe { MatMut::from_raw_parts_mut(dst.at(cols.start), m, p, n as isize, 1) };
        faer::linalg::matmul::matmul(out, Accum::Replace, lhs, rhs, 1f32, Par::Seq);
    });
    // SAFETY: the panels cover every column of every row.
    unsafe { assume_init(out) }
}

/// a·B + (a·U)·V and a·U, B as in [`product`], for a LoRA adapter's `factors` (see
/// [`Factors`]): its products in the same pass of the bf16 kernel ([`LowRank`]). None where no
/// bf16 kernel runs this product.
pub fn product_plus_low_rank(
    w: &Planes,
    orientation: Orientation,
    compute: DType,
    a: Strided<f32>,
    factors: &Factors<'_>,
) -> Option<(Vec<f32>, Vec<f32>)> {
    let (_, n) = w.product_dims(orientation);
    let m = a.rows;
    let kernel = w.bf16_kernel(orientation, compute, m)?;
    let low = LowRank::new(kernel, a, factors);
    let out = w.tile_panels(orientation, kernel, (m, n), low.rows(), Some(&low));
    Some((out, low.into_thin()))
}

impl Planes<'_> {
    /// (k, n) of a product with this weight in `orientation`.
    fn product_dims(&self, orientation: Orientation) -> (usize, usize) {
        let (rows, cols) = self.dims;
        match orientation {
            Orientation::Transposed => (cols, rows),
            Orientation::Plain => (rows, cols),
        }
    }

    /// The bf16 kernel a product of `m` rows takes where the compute dtype is bf16 and a dense
    /// bf16 weight would take it.
    fn bf16_kernel(
        &self,
        orientation: Orientation,
        compute: DType,
        m: usize,
    ) -> Option<amx::Bf16Kernel> {
        let (k, n) = self.product_dims(orientation);
        match compute {
            DType::BF16 => weight_kernel(m, k, n, orientation == Orientation::Transposed),
            _ => None,
        }
    }

    /// The panels of output columns for a product of `m` rows, and whether they run in parallel:
    /// whole bf16 kernel blocks (32 columns) and, for W's columns, whole quant blocks; about
    /// four per thread.
    fn panels(&self, orientation: Orientation, m: usize) -> (Vec<Range<usize>>, bool) {
        let (k, n) = self.product_dims(orientation);
        let threads = rayon::current_num_threads();
        let unit = match orientation {
            Orientation::Transposed => 32,
            Orientation::Plain => self.format.block().max(32),
        };
        let width =
            (n.div_ceil(4 * threads).div_ceil(unit) * unit).clamp(unit, MAX_PANEL.max(unit));
        let panels = (0..n)
            .step_by(width)
            .map(|c| c..(c + width).min(n))
            .collect();
        (panels, threads > 1 && 2 * m * k * n >= PARALLEL_FLOPS)
    }

    /// The product of the packed bf16 `rows` (of `lda` u16) with the decoded weight on `kernel`,
    /// a panel at a time, plus the low-rank update `low` whose columns follow k in `rows`.
    fn tile_panels(
        &self,
        orientation: Orientation,
        kernel: amx::Bf16Kernel,
        (m, n): (usize, usize),
        (rows, lda): (&[u16], usize),
        low: Option<&LowRank>,
    ) -> Vec<f32> {
        let (k, _) = self.product_dims(orientation);
        let kp = k.next_multiple_of(32);
        let mut out = uninit::<f32>(m * n);
        let dst = SendPtr(out.as_mut_ptr().cast::<f32>());
        let (panels, parallel) = self.panels(orientation, m);
        for_each(parallel, &panels, |cols| {
            let p = cols.len();
            let mut packed = vec![0u16; amx::packed_len(p, kp)];
            self.fill_packed(orientation, cols.clone(), kp, &mut packed);
            let mut parts = vec![RhsPart {
                data: &packed,
                steps: kp / 32,
                group_steps: kp / 32,
            }];
            parts.extend(low.and_then(|low| low.v_part(cols.start)));
            // SAFETY: only this panel writes these columns of every row of `out` (m × n); the
            // kernel is one this CPU runs.
            unsafe {
                amx::compute_columns(kernel, (rows, lda), &parts, (m, p), dst.at(cols.start), n)
            };
        });
        // SAFETY: the panels cover every column of every row.
        unsafe { assume_init(out) }
    }
}

/// Runs `run` on every panel, spread over threads when `parallel`.
fn for_each(parallel: bool, panels: &[Range<usize>], run: impl Fn(Range<usize>) + Sync) {
    if parallel {
        panels.par_iter().for_each(|c| run(c.clone()));
    } else {
        panels.iter().for_each(|c| run(c.clone()));
    }
}

/// Rounds an f32 to `compute` and back, as a dense weight of that dtype holds it.
fn rounding(compute: DType) -> fn(f32) -> f32 {
    match compute {
        DType::BF16 => |v| f32::from_bits(u32::from(narrow_bf16(v).to_bits()) << 16),
        DType::F16 => |v| f16::from_f32(v).to_f32(),
        _ => |v| v,
    }
}
