//! `feinschliff bench kernels`: GFLOP/s of the products with a bf16 weight on each kernel this CPU
//! runs — AMX tiles, AVX512_BF16 dot products, and f32 (faer, the weight widened beforehand) — on
//! the projection shapes of a SmolLM2-135M train step (4 × 256 rows) and a rank-16 adapter's x·Aᵀ,
//! with the weight packed once as in training. Shows which kernel a machine picks and what it
//! gains (`lscpu` says which features exist). A second table times the same products with the
//! weight quantized (`[model] quantize`, decoded a panel at a time) against the packed bf16
//! weight, forward (x·Wᵀ) and for the input gradient (g·W). A last line gives one core's peak rate
//! of the kernels' inner instructions ([`crate::bench_throughput`]), the ceiling the tables'
//! figures are measured against.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use half::bf16;
use std::fmt::Write;
use std::mem::MaybeUninit;
use std::time::Instant;

use crate::model::kernels::amx::{self, Bf16Kernel, PackedRhs};
use crate::model::kernels::elements::Strided;
use crate::model::kernels::frozen_weight::FrozenWeight;
use crate::model::kernels::projection_weight::ProjectionWeight;
use crate::model::kernels::quant::{Quantization, QuantizedWeight};
use crate::model::linear::frozen_matmul;

/// (rows, in, out) of the smol model's projections: q/o, k/v, gate/up, down.
const SHAPES: [(usize, usize, usize); 4] = [
    (1024, 576, 576),
    (1024, 576, 192),
    (1024, 576, 1536),
    (1024, 1536, 576),
];

/// (rows, in, rank) of a rank-16 LoRA adapter's x·Aᵀ, which the bf16 kernels compute in the
/// frozen product's pass (one block of columns, so the threads split the rows).
const ADAPTER_SHAPE: (usize, usize, usize) = (1024, 576, 16);

/// Products timed per kernel and shape, after one warm-up product.
const REPEATS: usize = 10;

/// The table: one line per shape, GFLOP/s per kernel ("-" where the CPU lacks it).
pub fn run() -> Result<String> {
    let kernels = [
        (Bf16Kernel::Amx, amx::available()),
        (
            Bf16Kernel::Avx512Bf16,
            crate::model::kernels::avx512_bf16::supported(),
        ),
    ];
    let mut table = format!(
        "bench kernels: x [rows, in] · Wᵀ for a bf16 W [out, in], {} threads, GFLOP/s\n{:>18} {:>8} {:>11} {:>12}\n",
        rayon::current_num_threads(),
        "rows × in × out",
        "AMX",
        "AVX512_BF16",
        "f32 (faer)"
    );
    for (m, k, n) in SHAPES.into_iter().chain([ADAPTER_SHAPE]) {
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1e3 - 0.5)
            .collect();
        let w: Vec<bf16> = (0..n * k)
            .map(|i| bf16::from_f32(((i * 104_729) % 1000) as f32 / 1e3 - 0.5))
            .collect();
        let lhs = Strided {
            data: &x[..],
            offset: 0,
            rows: m,
            cols: k,
            strides: (k, 1),
        };
        let packed = PackedRhs::new(&Strided {
            data: &w[..],
            offset: 0,
            rows: k,
            cols: n,
            strides: (1, k),
        });
        let mut out = vec![MaybeUninit::<f32>::uninit(); m * n];
        let flops = 2.0 * (m * k * n) as f64;
        let mut cells = Vec::new();
        for (kernel, runs) in kernels {
            cells.push(match runs {
                true => format!(
                    "{:.0}",
                    flops / seconds(|| amx::product_packed(kernel, lhs, &packed, &mut out)) / 1e9
                ),
                false => "-".to_string(),
            });
        }
        let widened: Vec<f32> = w.iter().map(|v| v.to_f32()).collect();
        let mut product = vec![0f32; m * n];
        let f32_time = seconds(|| {
            faer::linalg::matmul::matmul(
                faer::MatMut::from_row_major_slice_mut(&mut product, m, n),
                faer::Accum::Replace,
                faer::MatRef::from_row_major_slice(&x, m, k),
                faer::MatRef::from_column_major_slice(&widened, k, n),
                1f32,
                faer::Par::rayon(0),
            )
        });
        cells.push(format!("{:.0}", flops / f32_time / 1e9));
        writeln!(
            table,
            "{:>18} {:>8} {:>11} {:>12}",
            format!("{m} × {k} × {n}"),
            cells[0],
            cells[1],
            cells[2]
        )?;
    }
    table.push_str(&quantized()?);
    writeln!(table, "{}", crate::bench_throughput::line())?;
    Ok(table)
}

/// The quantized products beside the packed bf16 weight's, in bf16 compute, GFLOP/s; then the
/// time to decode each quantized weight whole (a merged export's, and a GPU product's, path).
fn quantized() -> Result<String> {
    let mut table = format!(
        "quantized W (bf16 compute), x·Wᵀ | g·W, GFLOP/s\n{:>18} {:>13} {:>13} {:>13} {:>13}\n",
        "rows × in × out", "bf16 (packed)", "q4_0", "q8_0", "nf4"
    );
    let mut decoding = format!(
        "quantized W decoded whole (QuantizedWeight::dequantize), ms\n{:>18} {:>13} {:>13} {:>13}\n",
        "out × in", "q4_0", "q8_0", "nf4"
    );
    for (m, k, n) in SHAPES {
        let x = Tensor::randn(0f32, 1.0, (m, k), &Device::Cpu)?;
        let g = Tensor::randn(0f32, 1.0, (m, n), &Device::Cpu)?;
        let w = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)? * 0.05)?;
        let mut weights = vec![ProjectionWeight::from(FrozenWeight::new(
            w.to_dtype(DType::BF16)?,
        ))];
        let mut decode_ms = Vec::new();
        for format in Quantization::ALL {
            let q = QuantizedWeight::quantize(&w, format, DType::BF16, &Device::Cpu)?;
            decode_ms.push(format!("{:.2}", seconds(|| drop(q.dequantize())) * 1e3));
            weights.push(q.into());
        }
        writeln!(
            decoding,
            "{:>18} {:>13} {:>13} {:>13}",
            format!("{n} × {k}"),
            decode_ms[0],
            decode_ms[1],
            decode_ms[2]
        )?;
        let flops = 2.0 * (m * k * n) as f64;
        let mut cells = Vec::new();
        for w in &weights {
            let forward = seconds(|| drop(frozen_matmul(&x, w)));
            let backward = seconds(|| drop(w.times(&g)));
            cells.push(format!(
                "{:.0} | {:.0}",
                flops / forward / 1e9,
                flops / backward / 1e9
            ));
        }
        writeln!(
            table,
            "{:>18} {:>13} {:>13} {:>13} {:>13}",
            format!("{m} × {k} × {n}"),
            cells[0],
            cells[1],
            cells[2],
            cells[3]
        )?;
    }
    table.push_str(&decoding);
    Ok(table)
}

/// Mean wall time of `product` over [`REPEATS`] runs after a warm-up.
fn seconds(mut product: impl FnMut()) -> f64 {
    product();
    let start = Instant::now();
    for _ in 0..REPEATS {
        product();
    }
    start.elapsed().as_secs_f64() / REPEATS as f64
}
