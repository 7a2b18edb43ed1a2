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

use super::{codec, Quantization};
use crate::model::amx::{self, SendPtr, Strided};
use crate::model::matmul::{assume_init, narrow_bf16, uninit, view, weight_kernel, PARALLEL_FLOPS};

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

pub enum Scales<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
}

/// Most output columns one panel covers.
const MAX_PANEL: usize = 256;

impl Planes<'_> {
    /// Decodes blocks `blocks` of row `row` into `out`, in order.
    #[inline]
    fn decode(&self, row: usize, blocks: Range<usize>, out: &mut [f32]) {
        let f = self.format;
        let (block, bytes) = (f.block(), f.code_bytes());
        let first = row * (self.dims.1 / block);
        for (b, out) in blocks.zip(out.chunks_exact_mut(block)) {
            let b = first + b;
            let scale = match self.scales {
                Scales::F16(s) => s[b].to_f32(),
                Scales::F32(s) => s[b],
            };
            codec::decode(f, &self.codes[b * bytes..(b + 1) * bytes], scale, out);
        }
    }

    /// The right operand's columns `cols` (of Wᵀ, or of W) decoded into `out` [k, cols.len()];
    /// returns its (row, column) strides: rows of W are decoded whole, so Wᵀ's columns are
    /// contiguous; W's columns come a block of each row at a time, so its rows are.
    fn decode_panel(
        &self,
        orientation: Orientation,
        cols: Range<usize>,
        out: &mut [f32],
    ) -> (usize, usize) {
        let (rows, width) = self.dims;
        let block = self.format.block();
        match orientation {
            Orientation::Transposed => {
                for (r, dst) in cols.zip(out.chunks_exact_mut(width)) {
                    self.decode(r, 0..width / block, dst);
                }
                (1, width)
            }
            Orientation::Plain => {
                let p = cols.len();
                for (r, dst) in out.chunks_exact_mut(p).take(rows).enumerate() {
                    self.decode(r, cols.start / block..cols.end / block, dst);
                }
                (p, 1)
            }
        }
    }
}

/// a [m, k] · B with B = Wᵀ ([`Orientation::Transposed`]) or W ([`Orientation::Plain`]), as f32
/// [m, n], the decoded values rounded to `compute`.
pub fn product(w: &Planes, orientation: Orientation, compute: DType, a: Strided<f32>) -> Vec<f32> {
    let (rows, cols) = w.dims;
    let (k, n) = match orientation {
        Orientation::Transposed => (cols, rows),
        Orientation::Plain => (rows, cols),
    };
    let m = a.rows;
    let mut out = uninit::<f32>(m * n);
    let threads = rayon::current_num_threads();
    // Panels of whole bf16 kernel blocks (32 columns) and, for W's columns, whole quant blocks;
    // about four per thread.
    let unit = match orientation {
        Orientation::Transposed => 32,
        Orientation::Plain => w.format.block().max(32),
    };
    let width = (n.div_ceil(4 * threads).div_ceil(unit) * unit).clamp(unit, MAX_PANEL.max(unit));
    let panels: Vec<Range<usize>> = (0..n)
        .step_by(width)
        .map(|c| c..(c + width).min(n))
        .collect();
    let parallel = threads > 1 && 2 * m * k * n >= PARALLEL_FLOPS;
    let dst = SendPtr(out.as_mut_ptr().cast::<f32>());
    let kernel = match compute {
        DType::BF16 => weight_kernel(m, k, n, orientation == Orientation::Transposed),
        _ => None,
    };
    match kernel {
        Some(kernel) => {
            let kp = k.next_multiple_of(32);
            let packed_a = amx::pack_rows(&a, kp);
            for_each(parallel, &panels, |cols| {
                let mut values = vec![0f32; k * cols.len()];
                let strides = w.decode_panel(orientation, cols.clone(), &mut values);
                let b = Strided {
                    data: &values,
                    offset: 0,
                    rows: k,
                    cols: cols.len(),
                    strides,
                };
                let packed = amx::pack_panel(&b, kp);
                // SAFETY: only this panel writes these columns of every row of `out` (m × n);
                // the kernel is one this CPU runs.
                unsafe {
                    amx::compute_columns(
                        kernel,
                        &packed_a,
                        &packed,
                        (m, kp, cols.len()),
                        dst.at(cols.start),
                        n,
                    )
                };
            });
        }
        None => {
            let round = rounding(compute);
            let lhs = view(a.data, a.offset, m, k, a.strides);
            for_each(parallel, &panels, |cols| {
                let p = cols.len();
                let mut values = vec![0f32; k * p];
                let strides = w.decode_panel(orientation, cols.clone(), &mut values);
                if let Some(round) = round {
                    values.iter_mut().for_each(|v| *v = round(*v));
                }
                let rhs = view(&values, 0, k, p, strides);
                // SAFETY: columns cols of the m × n output, written by this panel only; faer
                // writes them all without reading (Replace).
                let out =
                    unsafe { MatMut::from_raw_parts_mut(dst.at(cols.start), m, p, n as isize, 1) };
                faer::linalg::matmul::matmul(out, Accum::Replace, lhs, rhs, 1f32, Par::Seq);
            });
        }
    }
    // SAFETY: the panels cover every column of every row.
    unsafe { assume_init(out) }
}

/// Runs `run` on every panel, spread over threads when `parallel`.
fn for_each(parallel: bool, panels: &[Range<usize>], run: impl Fn(Range<usize>) + Sync) {
    if parallel {
        panels.par_iter().for_each(|c| run(c.clone()));
    } else {
        panels.iter().for_each(|c| run(c.clone()));
    }
}

/// Rounds an f32 to `compute` and back, as a dense weight of that dtype holds it; None for f32.
fn rounding(compute: DType) -> Option<fn(f32) -> f32> {
    match compute {
        DType::BF16 => Some(|v| f32::from_bits(u32::from(narrow_bf16(v).to_bits()) << 16)),
        DType::F16 => Some(|v| f16::from_f32(v).to_f32()),
        _ => None,
    }
}
