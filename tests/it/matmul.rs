//! The fast product equals candle's matmul: f32 and f64 on contiguous, transposed and batched
//! operands with odd sizes (tails of every kernel dimension), bf16 and f16 at their precision
//! (accumulated in f32, so closer to the f64 product than candle's half-precision matmul).

use super::common::{max_abs_diff, random};
use candle_core::{DType, Tensor};
use feinschliff::model::kernels::matmul::{matmul, matmul_wide};

#[test]
fn equals_candle_matmul_on_strided_batched_and_odd_shapes() {
    // The last two are wide enough to run in panels of columns (with a narrower last panel).
    let cases: [(&[usize], &[usize]); 7] = [
        (&[1, 1], &[1, 1]),
        (&[17, 33], &[33, 65]),
        (&[3, 37, 129], &[3, 129, 7]),
        (&[2, 3, 5, 64], &[2, 3, 64, 19]),
        (&[130, 257], &[257, 100]),
        (&[9, 40], &[40, 2085]),
        (&[2, 9, 40], &[2, 40, 2085]),
    ];
    for (seed, (da, db)) in cases.iter().enumerate() {
        for dtype in [DType::F64, DType::F32] {
            let a = random(da, seed as u64).to_dtype(dtype).unwrap();
            let b = random(db, seed as u64 + 100).to_dtype(dtype).unwrap();
            let want = a.matmul(&b).unwrap();
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-4 };
            assert!(
                max_abs_diff(&matmul(&a, &b).unwrap(), &want) < tol,
                "{da:?}·{db:?} {dtype:?}"
            );
            // The same product from transposed views (no copies).
            let rank = da.len();
            let at = a
                .transpose(rank - 2, rank - 1)
                .unwrap()
                .contiguous()
                .unwrap();
            let bt = b
                .transpose(rank - 2, rank - 1)
                .unwrap()
                .contiguous()
                .unwrap();
            let from_views = matmul(
                &at.transpose(rank - 2, rank - 1).unwrap(),
                &bt.transpose(rank - 2, rank - 1).unwrap(),
            )
            .unwrap();
            assert!(
                max_abs_diff(&from_views, &want) < tol,
                "views {da:?}·{db:?} {dtype:?}"
            );
        }
    }
}

#[test]
fn half_precision_products_accumulate_in_f32() {
    for dtype in [DType::BF16, DType::F16] {
        // Wide enough that the right operand is widened in several panels.
        let a = random(&[9, 300], 1).to_dtype(dtype).unwrap();
        let w = random(&[4001, 300], 2).to_dtype(dtype).unwrap();
        let got = matmul(&a, &w.t().unwrap()).unwrap();
        assert_eq!(got.dtype(), dtype);
        let exact = a
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap();
        // One rounding of the result to the half type: relative 2^-8 (bf16) of |values| ≲ 60.
        let err = max_abs_diff(&got, &exact);
        assert!(err < 0.25, "{dtype:?}: {err}");
    }
}

#[test]
fn half_precision_weights_in_an_input_gradient_sum_every_row_panel() {
    // g·W for a tall W [k, n] with contiguous rows (the LM head's input gradient): widened a run
    // of rows at a time (4001 rows of 300 make two panels, the second a tail), the panels'
    // products adding up; an f32 sum of exact half-precision products.
    for dtype in [DType::BF16, DType::F16] {
        let g = random(&[9, 4001], 5).to_dtype(dtype).unwrap();
        let w = random(&[4001, 300], 6).to_dtype(dtype).unwrap();
        let got = matmul_wide(&g, &w).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let exact = g
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&w.to_dtype(DType::F64).unwrap())
            .unwrap();
        let err = max_abs_diff(&got, &exact);
        assert!(err < 1e-3, "{dtype:?}: {err}");
    }
}

#[test]
fn tracked_operands_keep_their_gradients() {
    let a = candle_core::Var::from_tensor(&random(&[4, 5], 3)).unwrap();
    let b = random(&[5, 6], 4);
    let y = matmul(a.as_tensor(), &b).unwrap().sum_all().unwrap();
    let grads = y.backward().unwrap();
    let ga = grads.get(a.as_tensor()).expect("gradient of a");
    let want = b
        .sum_keepdim(1)
        .unwrap()
        .t()
        .unwrap()
        .broadcast_as((4, 5))
        .unwrap();
    assert!(max_abs_diff(ga, &want) < 1e-12);
}

#[test]
fn amx_tiles_equal_the_exact_product_of_bf16_values() {
    if !feinschliff::model::kernels::amx::available() {
        eprintln!("skipped: this CPU (or kernel) offers no AMX-BF16 tiles; the widening f32 path ran in the other tests");
        return;
    }
    // Tails in every tile dimension: 37 rows (32 + 5), k = 300 (9 × 32 + 12), 403 columns.
    let x = random(&[37, 300], 5).to_dtype(DType::F32).unwrap();
    let w = random(&[403, 300], 6).to_dtype(DType::BF16).unwrap();
    let exact = |lhs: &Tensor| {
        lhs.to_dtype(DType::F64)
            .unwrap()
            .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap()
    };
    // bf16 × bf16, and f32 activations (rounded to bf16 for the tiles) × bf16 weights.
    let x_bf16 = x.to_dtype(DType::BF16).unwrap();
    let want = exact(&x_bf16);
    for lhs in [x_bf16, x] {
        let got = feinschliff::model::kernels::matmul::matmul_wide(&lhs, &w.t().unwrap()).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let err = max_abs_diff(&got, &want);
        assert!(err < 1e-3, "{:?} lhs: {err}", lhs.dtype());
    }
    // Batched, with the weight transposed the other way (the backward pass's grad · W).
    let g = random(&[2, 33, 403], 7).to_dtype(DType::BF16).unwrap();
    let wb = w.unsqueeze(0).unwrap().repeat((2, 1, 1)).unwrap();
    let got = feinschliff::model::kernels::matmul::matmul_wide(&g, &wb).unwrap();
    let want = g
        .to_dtype(DType::F64)
        .unwrap()
        .matmul(&wb.to_dtype(DType::F64).unwrap())
        .unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-3);
}

#[test]
fn a_frozen_weight_packed_once_gives_the_products_of_packing_every_time() {
    use feinschliff::model::kernels::frozen_weight::FrozenWeight;
    use feinschliff::model::linear::frozen_matmul;
    if !feinschliff::model::kernels::amx::available() {
        eprintln!("skipped: this CPU (or kernel) offers no AMX-BF16 tiles, so nothing is packed");
        return;
    }
    // Tails in every tile dimension, and enough rows for the AMX kernel (not the few-row path).
    let w = random(&[403, 300], 8).to_dtype(DType::BF16).unwrap();
    let frozen = FrozenWeight::new(w.clone());
    for (rows, seed) in [(37, 9), (70, 10), (37, 11)] {
        let x = random(&[rows, 300], seed).to_dtype(DType::F32).unwrap();
        let packed = frozen_matmul(&x, &frozen.clone().into()).unwrap();
        let per_call =
            feinschliff::model::kernels::matmul::matmul_wide(&x, &w.t().unwrap()).unwrap();
        assert_eq!(max_abs_diff(&packed, &per_call), 0.0, "x·Wᵀ, {rows} rows");
        let logits = frozen.transposed_product_f32(&x).unwrap().unwrap();
        assert_eq!(
            logits,
            per_call.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let g = random(&[rows, 403], seed + 100)
            .to_dtype(DType::F32)
            .unwrap();
        let packed = frozen.times(&g).unwrap();
        let per_call = feinschliff::model::kernels::matmul::matmul_wide(&g, &w).unwrap();
        assert_eq!(max_abs_diff(&packed, &per_call), 0.0, "g·W, {rows} rows");
        let (c, d) = (
            random(&[rows, 5], seed + 200),
            random(&[5, 300], seed + 300),
        );
        let (c, d) = (
            c.to_dtype(DType::F32).unwrap(),
            d.to_dtype(DType::F32).unwrap(),
        );
        let sum = frozen.times_plus(&g, (&c, &d), 0.5).unwrap();
        let want = (per_call + (c.matmul(&d).unwrap() * 0.5).unwrap()).unwrap();
        assert!(max_abs_diff(&sum, &want) < 1e-4, "g·W + c·d, {rows} rows");
    }
}

#[test]
fn each_bf16_kernel_this_cpu_runs_equals_the_exact_product_of_bf16_values() {
    use feinschliff::model::kernels::amx::{self, Bf16Kernel, PackedRhs};
    use feinschliff::model::kernels::elements::Strided;
    let kernels: Vec<Bf16Kernel> = [
        (Bf16Kernel::Amx, amx::available()),
        (
            Bf16Kernel::Avx512Bf16,
            feinschliff::model::kernels::avx512_bf16::supported(),
        ),
    ]
    .into_iter()
    .filter_map(|(kernel, runs)| runs.then_some(kernel))
    .collect();
    if kernels.is_empty() {
        eprintln!("skipped: this CPU has neither AMX-BF16 nor AVX512_BF16");
        return;
    }
    // Tails in every block dimension: 45 rows (32 + 8 + 5), k = 302 (odd pairs), 403 columns;
    // a k long enough to run in chunks (4,400 = 137 steps of 32 + 16), as the LM head's input
    // gradient runs over the vocabulary; a last block of exactly 16 columns (400); and 16
    // columns alone (a rank-16 factor's x·Aᵀ: one block, the threads splitting 70 rows).
    for (m, k, n) in [
        (45, 302, 403),
        (45, 4400, 70),
        (45, 302, 400),
        (70, 302, 16),
    ] {
        let a = random(&[m, k], 12).to_dtype(DType::BF16).unwrap();
        let w = random(&[n, k], 13).to_dtype(DType::BF16).unwrap();
        let exact: Vec<f64> = a
            .to_dtype(DType::F64)
            .unwrap()
            .matmul(&w.to_dtype(DType::F64).unwrap().t().unwrap())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let (a, w) = (
            a.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
            w.flatten_all().unwrap().to_vec1::<half::bf16>().unwrap(),
        );
        let lhs = Strided {
            data: &a[..],
            offset: 0,
            rows: m,
            cols: k,
            strides: (k, 1),
        };
        // The weight's transpose, as the forward pass multiplies it.
        let rhs = Strided {
            data: &w[..],
            offset: 0,
            rows: k,
            cols: n,
            strides: (1, k),
        };
        let packed = PackedRhs::new(&rhs);
        for &kernel in &kernels {
            let mut out = vec![std::mem::MaybeUninit::new(f32::NAN); m * n];
            amx::product_packed(kernel, lhs, &packed, &mut out);
            let worst = out
                .iter()
                .zip(&exact)
                .map(|(got, want)| (f64::from(unsafe { got.assume_init() }) - want).abs())
                .fold(0.0, |worst, err| {
                    if err.is_nan() {
                        f64::INFINITY
                    } else {
                        worst.max(err)
                    }
                });
            assert!(worst < 1e-3, "{kernel:?}, k = {k}: {worst}");
        }
    }
}
