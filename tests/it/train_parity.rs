//! Training equals PyTorch + PEFT: Feinschliff's optimizer steps (accumulation, loss normalisation,
//! clipping, AdamW, the schedule) reproduce a Trainer-style reference loop's losses, gradient norms,
//! learning rates and final adapter; and PEFT reads an adapter Feinschliff trained to Feinschliff's
//! logits. Fixtures: tests/fixtures/training, made by tests/fixtures/make_training_fixture.py.

use candle_core::{DType, Device, Tensor};
use feinschliff::data::{Batch, Example};
use feinschliff::model::weights::Weights;
use feinschliff::model::{adapter, CausalLm, ModelConfig, TokenLayout};
use feinschliff::recipe::{Schedule, TrainSection};
use feinschliff::train::step::Optimization;
use serde::Deserialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::common::{max_abs_diff, repo};

/// f32 against PyTorch's f32; the script checks that its float64 run agrees to 2e-6.
const TOLERANCE: f64 = 1e-5;
/// As the forward-parity tests.
const LOGITS_TOLERANCE: f64 = 1e-4;

#[derive(Deserialize)]
struct Golden {
    hyper: Hyper,
    scenarios: HashMap<String, Scenario>,
}

#[derive(Deserialize)]
struct Hyper {
    lr: f64,
    adam_beta1: f64,
    adam_beta2: f64,
    adam_eps: f64,
    weight_decay: f64,
}

#[derive(Deserialize)]
struct Scenario {
    schedule: Schedule,
    warmup_steps: usize,
    max_grad_norm: f64,
    steps: Vec<Step>,
}

#[derive(Deserialize)]
struct Step {
    micro_batches: Vec<Vec<Row>>,
    lr: f64,
    loss: f64,
    grad_norm: f64,
    targets: usize,
}

#[derive(Deserialize)]
struct Row {
    input_ids: Vec<u32>,
    labels: Vec<i64>,
}

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/training")
}

/// The fixture's base model in f32.
fn base() -> CausalLm {
    let dir = fixture().join("model");
    let config = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let weights = Weights::open(&dir, DType::F32, &Device::Cpu).unwrap();
    CausalLm::load(config, &weights, &Device::Cpu).unwrap()
}

/// The base model with the adapter in `adapter_dir` attached as `--adapter` does.
fn model_with(adapter_dir: &Path) -> CausalLm {
    let mut lm = base();
    adapter::load(adapter_dir, &Device::Cpu)
        .unwrap()
        .apply(&mut lm)
        .unwrap();
    lm
}

fn safetensors(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join(name), &Device::Cpu).unwrap()
}

fn close(what: &str, step: usize, ours: f64, reference: f64) {
    assert!(
        (ours - reference).abs() <= TOLERANCE,
        "step {step}: {what} {ours} vs PyTorch {reference}"
    );
}

/// Runs the scenario's steps through [`Optimization`] (as `train` does) and compares each step and
/// the final A and B with the reference.
fn check(scenario: &str) {
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(fixture().join("golden.json")).unwrap())
            .unwrap();
    let (h, s) = (&golden.hyper, &golden.scenarios[scenario]);
    let train = TrainSection {
        lr: h.lr,
        lr_schedule: s.schedule,
        warmup_steps: s.warmup_steps,
        weight_decay: h.weight_decay,
        adam_beta1: h.adam_beta1,
        adam_beta2: h.adam_beta2,
        adam_eps: h.adam_eps,
        max_grad_norm: s.max_grad_norm,
        ..TrainSection::default()
    };
    let lm = model_with(&fixture().join("initial_adapter"));
    let trainable = adapter::trainable(&lm);
    let mut optimization = Optimization::new(trainable.clone(), &train, s.steps.len()).unwrap();
    for (i, step) in s.steps.iter().enumerate() {
        let examples: Vec<Vec<Example>> = step
            .micro_batches
            .iter()
            .map(|rows| {
                rows.iter()
                    .map(|r| Example::single(r.input_ids.clone(), r.labels.clone()))
                    .collect()
            })
            .collect();
        let batches: Vec<Batch> = examples
            .iter()
            .map(|mb| Batch::pad(&mb.iter().collect::<Vec<_>>(), 0, &Device::Cpu).unwrap())
            .collect();
        let targets: usize = batches.iter().map(|b| b.target_tokens).sum();
        assert_eq!(targets, step.targets, "step {}: target count", i + 1);
        let outcome = optimization.step(&lm, &batches).unwrap();
        close("lr", i + 1, outcome.lr, step.lr);
        close("loss", i + 1, outcome.loss, step.loss);
        close("grad norm", i + 1, outcome.grad_norm, step.grad_norm);
    }
    let expected = safetensors(&format!("golden_{scenario}.safetensors"));
    let initial = candle_core::safetensors::load(
        fixture().join("initial_adapter/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(trainable.len(), expected.len());
    for (name, var) in &trainable {
        let diff = max_abs_diff(var.as_tensor(), &expected[name]);
        assert!(
            diff <= TOLERANCE,
            "{name}: max |diff| {diff} against PyTorch"
        );
        // The steps must have moved the adapter, or the comparison proves nothing.
        assert!(max_abs_diff(&initial[name], &expected[name]) > 10.0 * TOLERANCE);
    }
}

#[test]
fn six_steps_with_accumulation_clipping_decay_and_warm_cosine_match_pytorch() {
    check("main");
}

#[test]
fn a_step_without_targets_skips_the_update_as_pytorch_adamw_does() {
    check("idle");
}

#[test]
fn peft_reads_a_feinschliff_trained_adapter_to_the_same_logits() {
    let g = safetensors("reference_loads_ours.safetensors");
    let ids = g["input_ids"].to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let forward = |lm: &CausalLm| lm.forward(&ids, &TokenLayout::causal(b, t), None).unwrap();
    let ours = forward(&model_with(&fixture().join("feinschliff_adapter")));
    let diff = max_abs_diff(&ours, &g["logits"]);
    assert!(diff <= LOGITS_TOLERANCE, "max |diff| {diff} against PEFT");
    // The trained adapter must matter, or the comparison proves nothing.
    assert!(max_abs_diff(&forward(&base()), &ours) > 1e-3);
}
