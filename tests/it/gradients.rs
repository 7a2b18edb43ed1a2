//! LoRA gradients through the whole decoder equal central finite differences (f64 model).

use candle_core::{DType, Device, Tensor, Var};
use feinschliff::data::{Batch, Example, IGNORE_INDEX};
use feinschliff::model::new::{config_json, random_weights, Size};
use feinschliff::model::weights::Weights;
use feinschliff::model::{adapter, LoraConfig, ModelConfig, TargetModules};
use feinschliff::train::loss::summed_nll;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::common::tiny_lm;

fn mean_loss(lm: &feinschliff::model::CausalLm, batch: &Batch) -> Tensor {
    let (nll, n) = summed_nll(lm, batch, None).unwrap();
    (nll / n as f64).unwrap()
}

fn set_element(var: &Var, index: usize, value: f64) {
    let mut v = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    v[index] = value;
    var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
        .unwrap();
}

/// A tiny f64 Gemma 2 whose soft caps bite (scores capped at 1, logits at 2) and whose window (3)
/// is shorter than the rows, so the gradients pass through tanh and both masks.
fn tiny_capped_gemma2() -> feinschliff::model::CausalLm {
    let shape = Size::Tiny.shape();
    let mut json = config_json("gemma2", &shape, false).unwrap();
    json["attn_logit_softcapping"] = 1.0.into();
    json["final_logit_softcapping"] = 2.0.into();
    json["sliding_window"] = 3.into();
    let config = ModelConfig::from_json(&json).unwrap();
    let weights = Weights::from_tensors(
        random_weights("gemma2", &shape, false, 7).unwrap(),
        DType::F64,
        &Device::Cpu,
    );
    feinschliff::model::CausalLm::load(config, &weights, &Device::Cpu).unwrap()
}

#[test]
fn lora_gradients_match_finite_differences() {
    // phi3: fused qkv_proj/gate_up_proj sliced after the LoRA product, 12 of 16 dimensions rotated.
    // gemma2: GeGLU, (1 + w) and sandwich norms, soft-capped attention and head loss;
    // gemma3_text: (1 + w) q/k norms, local RoPE tables.
    for arch in ["llama", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text"] {
        let mut lm = if arch == "gemma2" {
            tiny_capped_gemma2()
        } else {
            tiny_lm(arch, DType::F64, 7)
        };
        let config = super::common::all_linear_lora(2, 4.0, 0.0);
        adapter::attach(&mut lm, &config, 3).unwrap();
        let trainable = adapter::trainable(&lm);
        // Non-zero B, so that A's gradient is non-zero too.
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (name, var) in &trainable {
            if name.contains("lora_B") {
                let v: Vec<f64> = (0..var.elem_count())
                    .map(|_| rng.random_range(-0.5..0.5))
                    .collect();
                var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        let examples: Vec<Example> = (0..2)
            .map(|row| {
                let ids: Vec<u32> = (0..9 + row).map(|_| rng.random_range(0..1000)).collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &t)| if i < 3 { IGNORE_INDEX } else { t as i64 })
                    .collect();
                Example::single(ids, labels)
            })
            .collect();
        let refs: Vec<&Example> = examples.iter().collect();
        let batch = Batch::pad(&refs, 0, &Device::Cpu).unwrap();

        let grads = mean_loss(&lm, &batch).backward().unwrap();
        let eps = 1e-5;
        let mut checked = 0;
        for (name, var) in trainable.iter().step_by(5) {
            let analytic = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for index in [0, base.len() / 2, base.len() - 1] {
                set_element(var, index, base[index] + eps);
                let plus = mean_loss(&lm, &batch).to_scalar::<f64>().unwrap();
                set_element(var, index, base[index] - eps);
                let minus = mean_loss(&lm, &batch).to_scalar::<f64>().unwrap();
                set_element(var, index, base[index]);
                let numeric = (plus - minus) / (2.0 * eps);
                let err = (numeric - analytic[index]).abs();
                assert!(
                    err <= 1e-6 + 1e-4 * numeric.abs(),
                    "{arch} {name}[{index}]: analytic {} vs numeric {numeric}",
                    analytic[index]
                );
                checked += 1;
            }
        }
        assert!(checked >= 12, "only {checked} gradient entries checked");
    }
}

#[test]
fn only_lora_parameters_receive_gradients() {
    let mut lm = tiny_lm("llama", DType::F32, 1);
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora: false,
    };
    adapter::attach(&mut lm, &config, 0).unwrap();
    let trainable = adapter::trainable(&lm);
    assert_eq!(trainable.len(), 2 * 2 * lm.config.num_hidden_layers);
    assert!(trainable
        .iter()
        .all(|(n, _)| n.contains("q_proj") || n.contains("v_proj")));
    let ex = Example::single(vec![5, 6, 7, 8], vec![5, 6, 7, 8]);
    let batch = Batch::pad(&[&ex], 0, &Device::Cpu).unwrap();
    let grads = mean_loss(&lm, &batch).backward().unwrap();
    let (_, first) = lm.linears().into_iter().next().unwrap();
    assert!(
        grads.get(first.weight.dense().unwrap()).is_none(),
        "a frozen base weight received a gradient"
    );
    for (name, var) in &trainable {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "{name} has no gradient"
        );
    }
}

#[test]
fn gradient_checkpointing_gives_the_plain_gradients() {
    use feinschliff::train::optim::{AdamW, AdamWParams};
    let make = |checkpointing: bool| {
        let mut lm = tiny_lm("qwen2", DType::F64, 5);
        let config = super::common::all_linear_lora(4, 8.0, 0.1);
        adapter::attach(&mut lm, &config, 9).unwrap();
        for (i, (_, var)) in adapter::trainable(&lm).iter().enumerate() {
            if i % 2 == 1 {
                var.set(&(var.as_tensor().ones_like().unwrap() * 0.01).unwrap())
                    .unwrap();
            }
        }
        lm.gradient_checkpointing = checkpointing;
        lm
    };
    let examples: Vec<Example> = (0..3)
        .map(|k| {
            let ids: Vec<u32> = (0..6 + k)
                .map(|i| (i * 37 + k * 11) as u32 % 1000)
                .collect();
            Example::single(ids.clone(), ids.iter().map(|&t| t as i64).collect())
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batches = [
        Batch::pad(&refs[..2], 0, &Device::Cpu).unwrap(),
        Batch::pad(&refs[2..], 0, &Device::Cpu).unwrap(),
    ];
    let params = AdamWParams {
        weight_decay: 0.01,
        ..AdamWParams::default()
    };
    let mut outcomes = Vec::new();
    for checkpointing in [false, true] {
        let lm = make(checkpointing);
        let trainable = adapter::trainable(&lm);
        let mut opt =
            AdamW::new(trainable.iter().map(|(_, v)| v.clone()).collect(), params).unwrap();
        let o = feinschliff::train::step::optimizer_step(
            &lm, &trainable, &mut opt, &batches, 1e-2, 0.0, 3, false,
        )
        .unwrap();
        let values: Vec<Vec<f64>> = trainable
            .iter()
            .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
            .collect();
        outcomes.push((o.loss, o.grad_norm, values));
    }
    let (plain, ckpt) = (&outcomes[0], &outcomes[1]);
    assert!(
        (plain.0 - ckpt.0).abs() < 1e-12,
        "loss {} vs {}",
        plain.0,
        ckpt.0
    );
    assert!(
        plain.1 > 0.0 && (plain.1 - ckpt.1).abs() < 1e-10 * plain.1,
        "grad norm {} vs {}",
        plain.1,
        ckpt.1
    );
    for (a, b) in plain.2.iter().zip(&ckpt.2) {
        for (x, y) in a.iter().zip(b) {
            assert!(
                (x - y).abs() < 1e-12,
                "parameter after the step: {x} vs {y}"
            );
        }
    }
}
