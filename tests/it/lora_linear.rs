//! The fused frozen-projection + LoRA op equals x·Wᵀ + s·((x⊙M)·Aᵀ)·Bᵀ composed from candle ops,
//! in its output and in the gradients of x, A and B, with and without a dropout mask, in f64 and
//! in f32 (where the CPU accumulates the adapter product into the base product); on a bf16
//! weight and the CPU's bf16 kernels, it equals the exact sum of the bf16 operands.

use candle_core::{DType, Device, Tensor, Var};
use feinschliff::model::kernels::frozen_weight::FrozenWeight;
use feinschliff::model::kernels::lora_linear::lora_linear;

use super::common::{max_abs_diff, random, relative_diff};

#[test]
fn fused_lora_linear_equals_the_composed_formula_and_its_gradients() {
    // f64 (the composed backend path) and f32 (on the CPU: the adapter product accumulated into
    // the base product's buffer, forward and backward).
    for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        let dev = Device::Cpu;
        let (n, inp, out, r, scale) = (5, 6, 4, 2, 1.5);
        let randn = |shape: (usize, usize)| {
            Tensor::randn(0f64, 1.0, shape, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap()
        };
        let x = Var::from_tensor(&randn((n, inp))).unwrap();
        let w = randn((out, inp));
        let a = Var::from_tensor(&randn((r, inp))).unwrap();
        let b = Var::from_tensor(&randn((out, r))).unwrap();
        let weights = randn((n, out));
        let keep: Vec<f64> = (0..n * inp)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 / 0.9 })
            .collect();
        let mask = Tensor::from_vec(keep, (n, inp), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        for mask in [None, Some(&mask)] {
            let dropped = match mask {
                Some(m) => x.as_tensor().mul(m).unwrap(),
                None => x.as_tensor().clone(),
            };
            let lora = dropped
                .matmul(&a.t().unwrap())
                .unwrap()
                .matmul(&b.t().unwrap())
                .unwrap();
            let reference = (x.matmul(&w.t().unwrap()).unwrap() + (lora * scale).unwrap()).unwrap();
            let fused = lora_linear(
                &x,
                &FrozenWeight::new(w.clone()).into(),
                &a,
                &b,
                scale,
                mask,
            )
            .unwrap();
            let diff = max_abs_diff(&fused, &reference);
            assert!(diff < tolerance, "{dtype:?}: output differs by {diff}");
            let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
            let want = loss(&reference).backward().unwrap();
            let got = loss(&fused).backward().unwrap();
            for (name, var) in [("x", &x), ("A", &a), ("B", &b)] {
                let diff = max_abs_diff(got.get(var).unwrap(), want.get(var).unwrap());
                assert!(
                    diff < tolerance,
                    "{dtype:?}, mask {}: d{name} differs by {diff}",
                    mask.is_some()
                );
            }
        }
    }
}

#[test]
fn a_bf16_input_runs_the_adapter_in_f32() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap();
    let w = Tensor::randn(0f32, 0.3, (4, 8), &dev).unwrap();
    let a = Tensor::randn(0f32, 0.3, (2, 8), &dev).unwrap();
    let b = Tensor::randn(0f32, 0.3, (4, 2), &dev).unwrap();
    let full = lora_linear(&x, &FrozenWeight::new(w.clone()).into(), &a, &b, 2.0, None).unwrap();
    let bf = |t: &Tensor| t.to_dtype(DType::BF16).unwrap();
    let half = lora_linear(
        &bf(&x),
        &FrozenWeight::new(bf(&w)).into(),
        &a,
        &b,
        2.0,
        None,
    )
    .unwrap();
    assert_eq!(half.dtype(), DType::BF16);
    assert!(max_abs_diff(&full, &half) < 0.05);
}

#[test]
fn on_the_bf16_kernels_the_adapter_rides_in_the_frozen_product_at_bf16_precision() {
    use feinschliff::model::kernels::amx;
    let Some(kernel) = amx::bf16_kernel() else {
        eprintln!("skipped: this CPU has no bf16 kernel (AMX-BF16, or AVX512_BF16 where preferred), so the adapter runs apart in f32");
        return;
    };
    // Tails in every tile dimension: 70 rows, 300 in (9 × 32 + 12), 403 out, rank 20.
    let (n, inp, out, r, scale) = (70, 300, 403, 20, 2.0);
    let f32_of = |t: Tensor, s: f64| (t * s).unwrap().to_dtype(DType::F32).unwrap();
    let x = Var::from_tensor(&f32_of(random(&[n, inp], 21), 1.0)).unwrap();
    let w = f32_of(random(&[out, inp], 22), 0.05)
        .to_dtype(DType::BF16)
        .unwrap();
    let a = Var::from_tensor(&f32_of(random(&[r, inp], 23), 0.1)).unwrap();
    let b = Var::from_tensor(&f32_of(random(&[out, r], 24), 0.1)).unwrap();
    let g = f32_of(random(&[n, out], 25), 1.0);
    let keep: Vec<f32> = (0..n * inp)
        .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 / 0.9 })
        .collect();
    let mask = Tensor::from_vec(keep, (n, inp), &Device::Cpu).unwrap();
    // The exact sums of the operands the kernel multiplies: bf16 values, f64 sums (scale 2
    // commutes with rounding). Under dropout the adapter takes x⊙M, and the masked update of dx
    // is summed apart in f32.
    let bf16_f64 = |t: &Tensor| {
        t.to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let f64_of = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let mm = |p: &Tensor, q: &Tensor| p.matmul(q).unwrap();
    for mask in [None, Some(&mask)] {
        let y = lora_linear(
            &x,
            &FrozenWeight::new(w.clone()).into(),
            &a,
            &b,
            scale,
            mask,
        )
        .unwrap();
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let dropped = match mask {
            Some(m) => x.as_tensor().mul(m).unwrap(),
            None => x.as_tensor().clone(),
        };
        let (xb, wb, ab, bb) = (bf16_f64(&x), f64_of(&w), bf16_f64(&a), bf16_f64(&b));
        let xa = mm(&bf16_f64(&dropped), &ab.t().unwrap());
        let want_y =
            (mm(&xb, &wb.t().unwrap()) + (mm(&bf16_f64(&xa), &bb.t().unwrap()) * scale)).unwrap();
        let gb = mm(&bf16_f64(&g), &bb);
        let want_dx = match mask {
            Some(m) => (mm(&bf16_f64(&g), &wb)
                + (mm(&gb, &f64_of(&a)) * scale)
                    .unwrap()
                    .mul(&f64_of(m))
                    .unwrap())
            .unwrap(),
            None => (mm(&bf16_f64(&g), &wb) + (mm(&bf16_f64(&gb), &ab) * scale)).unwrap(),
        };
        let want_da = (mm(&gb.t().unwrap(), &f64_of(&dropped)) * scale).unwrap();
        let want_db = (mm(&f64_of(&g).t().unwrap(), &xa) * scale).unwrap();
        for (name, got, want) in [
            ("y", &y, &want_y),
            ("dx", grads.get(&x).unwrap(), &want_dx),
            ("dA", grads.get(&a).unwrap(), &want_da),
            ("dB", grads.get(&b).unwrap(), &want_db),
        ] {
            let err = relative_diff(got, want);
            assert!(
                err < 4e-3,
                "{kernel:?}, mask {}: {name} differs by {err} of its largest value",
                mask.is_some()
            );
        }
    }
}
