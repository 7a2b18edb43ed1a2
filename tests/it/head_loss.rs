//! The LM head's blockwise cross-entropy equals log-softmax + gather differentiated by candle, in
//! the per-row losses and in the hidden states' gradient, for any block size, with and without
//! Gemma 2's soft-capped logits (cap·tanh(logit/cap)); eval's log-probabilities of chosen tokens
//! equal log-softmax + gather and argmax.

use super::common::max_abs_diff;
use candle_core::{DType, Device, Tensor, Var, D};
use feinschliff::model::kernels::cross_entropy;
use feinschliff::model::kernels::frozen_weight::FrozenWeight;

#[test]
fn blockwise_head_loss_equals_log_softmax_and_its_gradient() {
    // In f64 and in f32 (at f32 precision).
    // f64 runs the composed path, f32 the CPU row kernel.
    for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
        for softcap in [None, Some(1.5)] {
            head_loss_matches(dtype, tol, softcap);
        }
    }
}

fn head_loss_matches(dtype: DType, tol: f64, softcap: Option<f64>) {
    let (rows, hidden, vocab) = (7, 5, 11);
    let dev = Device::Cpu;
    let h = Var::from_tensor(
        &Tensor::randn(0f64, 1.0, (rows, hidden), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap(),
    )
    .unwrap();
    let head = Tensor::randn(0f64, 1.0, (vocab, hidden), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let targets = Tensor::new(&[0u32, 10, 3, 3, 7, 1, 9], &dev).unwrap();
    let weights = Tensor::randn(0f64, 1.0, rows, &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();

    let mut logits = h.matmul(&head.t().unwrap()).unwrap();
    if let Some(cap) = softcap {
        logits = ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap();
    }
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    let reference = log_probs
        .gather(&targets.unsqueeze(1).unwrap(), 1)
        .unwrap()
        .squeeze(1)
        .unwrap()
        .neg()
        .unwrap();
    let ref_grad = (&reference * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let ref_grad = ref_grad.get(&h).unwrap();
    for block in [7, 3, 1] {
        let frozen = FrozenWeight::new(head.clone());
        let nll = cross_entropy::head_nll(&h, &frozen, &targets, block, softcap).unwrap();
        assert!(
            max_abs_diff(&nll, &reference) < tol,
            "block {block}, cap {softcap:?}: losses differ"
        );
        let grads = (&nll * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let diff = max_abs_diff(grads.get(&h).unwrap(), ref_grad);
        assert!(
            diff < tol,
            "block {block}, cap {softcap:?}: gradient differs by {diff}"
        );
        assert!(grads.get(&head).is_none(), "the frozen head got a gradient");
    }
}

#[test]
fn bf16_head_loss_is_computed_in_f32() {
    let dev = Device::Cpu;
    let h = Tensor::randn(0f32, 1.0, (4, 8), &dev).unwrap();
    let head = Tensor::randn(0f32, 1.0, (50, 8), &dev).unwrap();
    let targets = Tensor::new(&[1u32, 2, 3, 49], &dev).unwrap();
    let full =
        cross_entropy::head_nll(&h, &FrozenWeight::new(head.clone()), &targets, 4, None).unwrap();
    let bf = |x: &Tensor| x.to_dtype(DType::BF16).unwrap();
    let half =
        cross_entropy::head_nll(&bf(&h), &FrozenWeight::new(bf(&head)), &targets, 3, None).unwrap();
    assert_eq!(half.dtype(), DType::F32);
    assert!(max_abs_diff(&full, &half) < 0.1);
}

#[test]
fn head_blocks_hold_a_bounded_number_of_logits() {
    assert_eq!(cross_entropy::block_rows(1024, 49152), 1024);
    let rows = cross_entropy::block_rows(4096, 128256);
    assert!(rows < 4096 && rows * 128256 * 4 <= 256 << 20);
}

/// Without gradients no logits are stored: a bf16 head on AMX tiles folds each block of logits
/// into running row statistics, on the AVX512_BF16 kernel each panel of 32 rows × 512 columns,
/// an f32 head (and a bf16 one without a bf16 kernel) each panel of 1,024 vocabulary columns. The losses equal the stored logits' (the gradient path's) at f32
/// precision, capped or not, with tails in rows and vocabulary, targets in every panel and
/// thread's columns, and maxima that move between panels (so a dropped rescaling fails).
#[test]
fn folded_head_loss_without_gradients_equals_the_stored_logits_loss() {
    for dtype in [DType::F32, DType::BF16] {
        folded_loss_matches(dtype);
    }
}

fn folded_loss_matches(dtype: DType) {
    let dev = Device::Cpu;
    let (rows, hidden, vocab) = (45, 64, 3001);
    let h = (Tensor::randn(0f32, 1.0, (rows, hidden), &dev).unwrap() * 0.5).unwrap();
    let head = Tensor::randn(0f32, 1.0, (vocab, hidden), &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    // Spread over the vocabulary, with its first and last column (in the last, cut block).
    let mut ids: Vec<u32> = (0..rows as u32).map(|i| (i * 677) % vocab as u32).collect();
    ids[1] = vocab as u32 - 1;
    let targets = Tensor::new(ids.as_slice(), &dev).unwrap();
    let frozen = FrozenWeight::new(head);
    for softcap in [None, Some(30.0)] {
        let folded = cross_entropy::head_nll(&h, &frozen, &targets, rows, softcap).unwrap();
        let tracked = Var::from_tensor(&h).unwrap();
        let stored =
            cross_entropy::head_nll(tracked.as_tensor(), &frozen, &targets, rows, softcap).unwrap();
        let diff = max_abs_diff(&folded, &stored.detach());
        assert!(
            diff < 1e-4,
            "{dtype:?}, cap {softcap:?}: losses differ by {diff}"
        );
        let largest = stored
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(largest > 1.0, "losses of a random head should be large");
    }
}

#[test]
fn target_logprobs_equal_log_softmax_and_argmax() {
    let dev = Device::Cpu;
    // 3 rows over a vocabulary of 37 (a tail after two 16-lane chunks); row 1 asks for no token,
    // row 2 for the same token twice; row 0's largest logit appears twice (ids 5 and 20).
    let mut values: Vec<f64> = Tensor::randn(0f64, 3.0, (3, 37), &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    values[5] = 20.0;
    values[20] = 20.0;
    let asked = vec![vec![5u32, 20, 0, 36], vec![], vec![36, 36, 11]];
    for (dtype, tol) in [(DType::F64, 1e-7), (DType::F32, 2e-6)] {
        let logits = Tensor::from_vec(values.clone(), (3, 37), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let got = cross_entropy::target_logprobs(&logits, &asked).unwrap();
        let reference: Vec<Vec<f64>> = candle_nn::ops::log_softmax(&logits, D::Minus1)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2()
            .unwrap();
        let argmax: Vec<u32> = logits.argmax(D::Minus1).unwrap().to_vec1().unwrap();
        assert_eq!(
            argmax[0], 5,
            "candle's argmax takes the first of equal maxima"
        );
        for (r, targets) in asked.iter().enumerate() {
            assert_eq!(got[r].len(), targets.len());
            for (&(logprob, greedy), &t) in got[r].iter().zip(targets) {
                let want = reference[r][t as usize];
                assert!(
                    (logprob as f64 - want).abs() <= tol * want.abs().max(1.0),
                    "{dtype:?} row {r} token {t}: {logprob} against {want}"
                );
                assert_eq!(greedy, argmax[r] == t, "{dtype:?} row {r} token {t}");
            }
        }
    }
    let bad = cross_entropy::target_logprobs(
        &Tensor::zeros((1, 4), DType::F32, &dev).unwrap(),
        &[vec![4]],
    );
    assert!(bad
        .unwrap_err()
        .to_string()
        .contains("outside the vocabulary"));
}
