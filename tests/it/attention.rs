//! The fused RMSNorm equals the composed formula and its gradient. Blockwise attention equals eager
//! attention (scores, softmax, weighted sum, built from differentiable ops and differentiated by
//! candle) in its output and in the gradients of Q, K, V, for grouped-query heads, a packed mask
//! and blocks that do not divide the sequence: the fused CPU kernel in f64 and f32, the composed
//! path (what CUDA and half-precision activations run) in bf16.

use super::common::max_abs_diff;
use candle_core::{DType, Device, Tensor, Var, D};
use feinschliff::model::sdpa;

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
    let scores = (q.matmul(&repeat(k).t().unwrap()).unwrap() / (d as f64).sqrt()).unwrap();
    let probs = candle_nn::ops::softmax(&scores.broadcast_add(mask).unwrap(), D::Minus1).unwrap();
    probs
        .matmul(&repeat(v))
        .unwrap()
        .reshape((b, kvh, groups * t, d))
        .unwrap()
}

#[test]
fn blockwise_attention_equals_eager_attention_and_its_gradients() {
    let (b, kvh, groups, t, d) = (2, 2, 3, 8, 4);
    let dev = Device::Cpu;
    let q = Var::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let k = Var::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
    let v = Var::randn(0f64, 1.0, (b, kvh, t, d), &dev).unwrap();
    let weights = Tensor::randn(0f64, 1.0, (b, kvh, groups * t, d), &dev).unwrap();
    let mask = packed_causal_mask(b, t);

    let reference = eager(&q, &k, &v, &mask, groups);
    let ref_grads = (&reference * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for block in [8, 3, 1] {
        let out = sdpa::attention(&q, &k, &v, &mask, block).unwrap();
        assert!(
            max_abs_diff(&out, &reference) < 1e-12,
            "block {block}: output differs"
        );
        let grads = (&out * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (name, var) in [("q", &q), ("k", &k), ("v", &v)] {
            let got = grads.get(var).expect("gradient");
            let want = ref_grads.get(var).expect("reference gradient");
            let diff = max_abs_diff(got, want);
            assert!(diff < 1e-12, "block {block}: d{name} differs by {diff}");
        }
    }
}

/// The output and the gradients of q, k, v of `sdpa::attention` for the upstream `weights`.
fn attention_and_gradients(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    block: usize,
    weights: &Tensor,
) -> Vec<Tensor> {
    let (qv, kv, vv) = (
        Var::from_tensor(q).unwrap(),
        Var::from_tensor(k).unwrap(),
        Var::from_tensor(v).unwrap(),
    );
    let out = sdpa::attention(&qv, &kv, &vv, mask, block).unwrap();
    let grads = (out.to_dtype(DType::F32).unwrap() * weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut all = vec![out.to_dtype(DType::F64).unwrap()];
    for var in [&qv, &kv, &vv] {
        let g = grads.get(var).expect("gradient");
        all.push(g.to_dtype(DType::F64).unwrap());
    }
    all
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
    let f64_of = |x: &Tensor| Var::from_tensor(&x.to_dtype(DType::F64).unwrap()).unwrap();
    let (q64, k64, v64) = (f64_of(&q), f64_of(&k), f64_of(&v));
    let reference = eager(&q64, &k64, &v64, &mask, groups);
    let ref_grads = (&reference * &weights.to_dtype(DType::F64).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let mut want = vec![reference];
    for var in [&q64, &k64, &v64] {
        want.push(ref_grads.get(var).expect("reference gradient").clone());
    }
    let mask32 = mask.to_dtype(DType::F32).unwrap();
    let got = attention_and_gradients(&q, &k, &v, &mask32, 64, &weights);
    for (name, (got, want)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(got.iter().zip(&want))
    {
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
    let full = attention_and_gradients(&q, &k, &v, &mask, t, &weights);
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let half = attention_and_gradients(&bf(&q), &bf(&k), &bf(&v), &mask, 5, &weights);
    for (name, (full, half)) in ["output", "dq", "dk", "dv"]
        .iter()
        .zip(full.iter().zip(&half))
    {
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
    use feinschliff::model::rms_norm::rms_norm;
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
