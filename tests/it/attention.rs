//! The fused RMSNorm equals the composed formula and its gradient. Blockwise attention equals eager
//! attention (scores, softmax, weighted sum, built from differentiable ops and differentiated by
//! candle) in its output and in the gradients of Q, K, V, for grouped-query heads, a packed mask
//! and blocks that do not divide the sequence: the fused CPU kernel in f64 and f32, the composed
//! path (what CUDA and half-precision activations run) in bf16; a bf16 model's inference, with
//! bf16 products on the CPU's bf16 kernel, at bf16 precision;
//! and new rows after a KV cache's keys.

use super::common::max_abs_diff;
use candle_core::{DType, Device, Tensor, Var, D};
use feinschliff::model::kernels::sdpa::{self, Scoring};

/// [batch, 1, seq, seq]: causal, with row 0 packed as two samples (positions 0..3 and 3..seq).
fn packed_causal_mask(batch: usize, seq: usize) -> Tensor {
    let mut mask = vec![0f64; batch * seq * seq];
    for row in 0..batch {
        let segment = |i: usize| usize::from(row == 0 && i >= 3);
        for i in 0..seq {
            for j in 0..seq {
                if j > i || segment(i) != segment(j) {
                    mask[(row * seq + i) * seq + j] = f64::NEG_INFINITY;
                }
            }
        }
    }
    Tensor::from_vec(mask, (batch, 1, seq, seq), &Device::Cpu).unwrap()
}

/// softmax(Q·Kᵀ/√d + mask)·V with K/V repeated for each query head of a group.
fn eager(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor, groups: usize) -> Tensor {
    let d = k.dim(3).unwrap();
    eager_scored(q, k, v, mask, groups, Scoring::standard(d))
}

/// softmax(scores + mask)·V, the scores scale·Q·Kᵀ capped to cap·tanh(s/cap) when `scoring` caps
/// them (transformers' Gemma 2 eager attention), differentiated by candle.
fn eager_scored(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    groups: usize,
    scoring: Scoring,
) -> Tensor {
    let (b, kvh, t, d) = k.dims4().unwrap();
    let q = q.reshape((b, kvh * groups, t, d)).unwrap();
    let repeat = |x: &Tensor| {
        x.unsqueeze(2)
            .unwrap()
            .repeat((1, 1, groups, 1, 1))
            .unwrap()
            .reshape((b, kvh * groups, t, d))
            .unwrap()
    };
    let mut scores = (q.matmul(&repeat(k).t().unwrap()).unwrap() * scoring.scale).unwrap();
    if let Some(cap) = scoring.softcap {
        scores = ((scores / cap).unwrap().tanh().unwrap() * cap).unwrap();
    }
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(mask).unwrap(), D::Minus1).unwrap();
    probs
        .matmul(&repeat(v))
        .unwrap()
        .reshape((b, kvh, groups * t, d))
        .unwrap()
}

/// The output of `attention` on q, k, v and its gradients for the upstream `weights`, as
/// [output, dq, dk, dv] in f64.
fn with_gradients(
    (q, k, v): (&Tensor, &Tensor, &Tensor),
    weights: &Tensor,
    attention: impl Fn(&Tensor, &Tensor, &Tensor) -> Tensor,
) -> Vec<Tensor> {
    let vars = [q, k, v].map(|x| Var::from_tensor(x).unwrap());
    let out = attention(&vars[0], &vars[1], &vars[2]);
    let grads = (out.to_dtype(weights.dtype()).unwrap() * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut all = vec![out.to_dtype(DType::F64).unwrap()];
    for var in &vars {
        let g = grads.get(var).expect("gradient");
        all.push(g.to_dtype(DType::F64).unwrap());
    }
    all
}

const NAMES: [&str; 4] = ["output", "dq", "dk", "dv"];

#[test]
fn blockwise_attention_equals_eager_attention_and_its_gradients() {
    let (b, kvh, groups, t, d) = (2, 2, 3, 8, 4);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let k = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
    let v = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
    let weights = Tensor::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let mask = packed_causal_mask(b, t);
    let want = with_gradients((&q, &k, &v), &weights, |q, k, v| {
        eager(q, k, v, &mask, groups)
    });
    for block in [8, 3, 1] {
        let got = with_gradients((&q, &k, &v), &weights, |q, k, v| {
            sdpa::attention(q, k, v, &mask, block, Scoring::standard(d)).unwrap()
        });
        for (name, (got, want)) in NAMES.iter().zip(got.iter().zip(&want)) {
            let diff = max_abs_diff(got, want);
            assert!(diff < 1e-12, "block {block}: {name} differs by {diff}");
        }
    }
}

/// Gemma 2's soft-capped scores with a scale other than 1/√d: the fused kernel (f64) and the
/// composed path (f64 operands with an f32 mask) equal eager attention with tanh, gradients
/// included (the backward carries the cap's 1 − tanh²).
#[test]
fn soft_capped_attention_equals_eager_attention_and_its_gradients() {
    let (b, kvh, groups, t, d) = (2, 2, 2, 9, 4);
    let dev = Device::Cpu;
    let q = (Tensor::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap() * 3.0).unwrap();
    let k = (Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap() * 3.0).unwrap();
    let v = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
    let weights = Tensor::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let mask = packed_causal_mask(b, t);
    let scoring = Scoring {
        scale: 0.3,
        softcap: Some(2.0),
        bf16_products: false,
    };
    let want = with_gradients((&q, &k, &v), &weights, |q, k, v| {
        eager_scored(q, k, v, &mask, groups, scoring)
    });
    let uncapped = with_gradients((&q, &k, &v), &weights, |q, k, v| {
        eager_scored(
            q,
            k,
            v,
            &mask,
            groups,
            Scoring {
                softcap: None,
                ..scoring
            },
        )
    });
    assert!(
        max_abs_diff(&want[0], &uncapped[0]) > 1e-2,
        "the cap must matter"
    );
    let mask32 = mask.to_dtype(DType::F32).unwrap();
    for (path, mask, tolerance) in [("fused", &mask, 1e-12), ("composed", &mask32, 1e-5)] {
        let got = with_gradients((&q, &k, &v), &weights, |q, k, v| {
            sdpa::attention(q, k, v, mask, 4, scoring).unwrap()
        });
        for (name, (got, want)) in NAMES.iter().zip(got.iter().zip(&want)) {
            let diff = max_abs_diff(got, want);
            assert!(diff < tolerance, "{path}: {name} differs by {diff}");
        }
    }
}

#[test]
fn fused_attention_in_f32_over_several_blocks_equals_eager_attention() {
    let (b, kvh, groups, t, d) = (2, 1, 3, 150, 16);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, kvh, t, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, kvh, t, d), &dev).unwrap();
    let weights = Tensor::randn(0f32, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let mask = packed_causal_mask(b, t);
    let f64_of = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
    let want = with_gradients(
        (&f64_of(&q), &f64_of(&k), &f64_of(&v)),
        &f64_of(&weights),
        |q, k, v| eager(q, k, v, &mask, groups),
    );
    let mask32 = mask.to_dtype(DType::F32).unwrap();
    let got = with_gradients((&q, &k, &v), &weights, |q, k, v| {
        sdpa::attention(q, k, v, &mask32, 64, Scoring::standard(d)).unwrap()
    });
    for (name, (got, want)) in NAMES.iter().zip(got.iter().zip(&want)) {
        let diff = max_abs_diff(got, want);
        assert!(
            diff < 1e-4,
            "{name} differs from eager f64 attention by {diff}"
        );
    }
}

#[test]
fn composed_attention_in_bf16_stays_close_to_f32_with_its_gradients() {
    let (b, kvh, groups, t, d) = (1, 2, 2, 16, 8);
    let dev = Device::Cpu;
    let q = Tensor::randn(0f32, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let k = Tensor::randn(0f32, 1.0, (b, kvh, t, d), &dev).unwrap();
    let v = Tensor::randn(0f32, 1.0, (b, kvh, t, d), &dev).unwrap();
    let weights = Tensor::randn(0f32, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let mask = packed_causal_mask(b, t).to_dtype(DType::F32).unwrap();
    let full = with_gradients((&q, &k, &v), &weights, |q, k, v| {
        sdpa::attention(q, k, v, &mask, t, Scoring::standard(d)).unwrap()
    });
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let half = with_gradients((&bf(&q), &bf(&k), &bf(&v)), &weights, |q, k, v| {
        sdpa::attention(q, k, v, &mask, 5, Scoring::standard(d)).unwrap()
    });
    for (name, (full, half)) in NAMES.iter().zip(full.iter().zip(&half)) {
        let scale = full
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let diff = max_abs_diff(full, half);
        assert!(
            diff < 0.05 * scale.max(1.0),
            "bf16 {name} differs from f32 by {diff}"
        );
    }
}

#[test]
fn blocks_hold_a_bounded_number_of_scores() {
    // Short sequences run in one block; longer ones in blocks of at most 64 query positions (a
    // causal block sees only the keys up to its last row); large ones under the byte budget.
    assert_eq!(sdpa::block_rows(4, 9, 48), 48);
    assert_eq!(sdpa::block_rows(4, 9, 256), 64);
    let rows = sdpa::block_rows(8, 32, 4096);
    assert!((1..4096).contains(&rows));
    assert!(8 * 32 * 4096 * rows * 4 <= 64 << 20);
    assert_eq!(
        4096 % rows,
        0,
        "4096 positions split into even blocks of {rows}"
    );
}

#[test]
fn fused_rms_norm_equals_the_composed_formula_and_its_gradient() {
    use feinschliff::model::kernels::rms_norm::rms_norm;
    let dev = Device::Cpu;
    let x = Var::randn(0f64, 1.0, (3, 5, 24), &dev).unwrap();
    let w = Tensor::randn(1f64, 0.2, 24, &dev).unwrap();
    let upstream = Tensor::randn(0f64, 1.0, (3, 5, 24), &dev).unwrap();
    let eps = 1e-5;
    let composed = {
        let var = x
            .as_tensor()
            .sqr()
            .unwrap()
            .mean_keepdim(D::Minus1)
            .unwrap();
        let normed = x
            .as_tensor()
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed.broadcast_mul(&w).unwrap()
    };
    let fused = rms_norm(x.as_tensor(), &w, eps).unwrap();
    assert!(max_abs_diff(&fused, &composed) < 1e-12);
    let grad_of = |y: &Tensor| {
        let loss = (y * &upstream).unwrap().sum_all().unwrap();
        loss.backward().unwrap().get(x.as_tensor()).unwrap().clone()
    };
    assert!(max_abs_diff(&grad_of(&fused), &grad_of(&composed)) < 1e-12);
}

#[test]
fn bf16_products_without_gradients_equal_eager_attention_at_bf16_precision() {
    let Some(kernel) = feinschliff::model::kernels::amx::bf16_kernel() else {
        eprintln!("skipped: this CPU has no bf16 kernel (AMX-BF16, or AVX512_BF16 where preferred), so attention multiplies in f32");
        return;
    };
    let dev = Device::Cpu;
    // Grouped heads, a packed mask, blocks of 32 over 70 positions (tails of every tile
    // dimension), head widths of one and of several tiles of k, and a capped variant.
    for (d, softcap) in [(40, None), (64, Some(2.0))] {
        let (b, kvh, groups, t) = (2, 2, 3, 70);
        let q = Tensor::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
        let k = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
        let v = Tensor::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
        let mask = packed_causal_mask(b, t);
        let scoring = Scoring {
            softcap,
            bf16_products: true,
            ..Scoring::standard(d)
        };
        let exact = eager_scored(&q, &k, &v, &mask, groups, scoring);
        let f32_of = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let run = |scoring: Scoring| {
            sdpa::attention(
                &f32_of(&q),
                &f32_of(&k),
                &f32_of(&v),
                &f32_of(&mask),
                32,
                scoring,
            )
            .unwrap()
        };
        let bf16 = run(scoring);
        let f32 = run(Scoring {
            bf16_products: false,
            ..scoring
        });
        let (err, f32_err) = (max_abs_diff(&bf16, &exact), max_abs_diff(&f32, &exact));
        assert!(err < 3e-2, "{kernel:?}, d {d}: {err}");
        assert!(f32_err < 1e-5, "d {d}: f32 products {f32_err}");
        assert!(
            err > 10.0 * f32_err,
            "{kernel:?}, d {d}: bf16 products ({err}) should round as f32 ones ({f32_err}) do not"
        );
    }
}

#[test]
fn new_rows_after_cached_keys_equal_the_last_rows_of_eager_attention() {
    // The last 20 of 70 positions read after a KV cache of the first 50: grouped heads, a packed
    // mask, blocks over the new rows (tails); f64 and f32 on the fused kernel, a capped variant,
    // and bf16 products where the CPU has a bf16 kernel.
    let dev = Device::Cpu;
    let (b, kvh, groups, total, past, d) = (2, 2, 3, 70, 50, 40);
    let t = total - past;
    let q = Tensor::randn(0f64, 1.0, (b, kvh, groups * total, d), &dev).unwrap();
    let k = Tensor::randn(0f64, 1.0, (b, kvh, total, d), &dev).unwrap();
    let v = Tensor::randn(0f64, 1.0, (b, kvh, total, d), &dev).unwrap();
    let mask = packed_causal_mask(b, total);
    // Each group's last t query rows, and their mask rows.
    let last_rows = |x: &Tensor| {
        x.reshape((b, kvh, groups, total, d))
            .unwrap()
            .narrow(3, past, t)
            .unwrap()
            .reshape((b, kvh, groups * t, d))
            .unwrap()
    };
    let new_mask = mask.narrow(2, past, t).unwrap();
    let bf16 = feinschliff::model::kernels::amx::bf16_kernel().is_some();
    for softcap in [None, Some(2.0)] {
        for (dtype, bf16_products) in [(DType::F64, false), (DType::F32, false), (DType::F32, true)]
        {
            if bf16_products && !bf16 {
                eprintln!("skipped bf16 products: this CPU has no bf16 kernel");
                continue;
            }
            let scoring = Scoring {
                softcap,
                bf16_products,
                ..Scoring::standard(d)
            };
            let want = last_rows(&eager_scored(&q, &k, &v, &mask, groups, scoring));
            let of = |x: &Tensor| x.to_dtype(dtype).unwrap();
            let got = sdpa::attention_after_past(
                &of(&last_rows(&q)),
                &of(&k),
                &of(&v),
                &of(&new_mask),
                scoring,
            )
            .unwrap();
            let err = max_abs_diff(&got, &want);
            let tol = match (dtype, bf16_products) {
                (DType::F64, _) => 1e-12,
                (_, false) => 1e-5,
                _ => 3e-2,
            };
            assert!(
                err < tol,
                "{dtype:?}, bf16 {bf16_products}, cap {softcap:?}: {err}"
            );
        }
    }
}
