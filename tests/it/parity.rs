//! Logits equal transformers' (and PEFT's, with an adapter) on committed tiny checkpoints.
//! Fixtures: tests/fixtures/parity, made by tests/fixtures/make_parity_fixtures.py.

use candle_core::{DType, Device, Tensor};
use feinschliff::model::decoder::{CausalLm, TokenLayout};
use feinschliff::model::weights::Weights;
use feinschliff::model::{adapter, ModelConfig};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::common::{max_abs_diff, repo};

const TOLERANCE: f64 = 1e-4;

pub(super) fn case_dir(case: &str) -> PathBuf {
    repo().join("tests/fixtures/parity").join(case)
}

pub(super) fn golden(case: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(case_dir(case).join("golden.safetensors"), &Device::Cpu).unwrap()
}

/// The case's checkpoint, read with its config.json (transformers 4.57 layout).
pub(super) fn load_lm(case: &str) -> CausalLm {
    load_lm_with(case, &case_dir(case).join("config.json"))
}

/// The case's weights with the config in `config_path`.
fn load_lm_with(case: &str, config_path: &Path) -> CausalLm {
    let dir = case_dir(case);
    let config = ModelConfig::from_file(config_path).unwrap();
    let weights = Weights::open(&dir, DType::F32, &Device::Cpu).unwrap();
    CausalLm::load(config, &weights, &Device::Cpu).unwrap()
}

pub(super) fn logits(lm: &CausalLm, ids: &Tensor) -> Tensor {
    let ids = ids.to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    lm.forward(&ids, &TokenLayout::causal(b, t), None).unwrap()
}

fn check_base(case: &str) {
    check_base_with(case, &case_dir(case).join("config.json"));
}

fn check_base_with(case: &str, config_path: &Path) {
    let g = golden(case);
    let lm = load_lm_with(case, config_path);
    let diff = max_abs_diff(&logits(&lm, &g["input_ids"]), &g["logits"]);
    assert!(
        diff <= TOLERANCE,
        "{case} with {}: max |diff| {diff} against transformers",
        config_path.display()
    );
}

fn check_adapted(case: &str) {
    let g = golden(case);
    let mut lm = load_lm(case);
    adapter::load(&case_dir(case).join("adapter"), &Device::Cpu)
        .unwrap()
        .apply(&mut lm)
        .unwrap();
    let diff = max_abs_diff(&logits(&lm, &g["input_ids"]), &g["adapted_logits"]);
    assert!(diff <= TOLERANCE, "{case}: max |diff| {diff} against PEFT");
    // The adapter must matter, or the comparison proves nothing.
    assert!(max_abs_diff(&g["logits"], &g["adapted_logits"]) > 1e-3);
}

#[test]
fn llama3_with_rope_scaling_matches_transformers() {
    check_base("llama3");
}

#[test]
fn llama2_tied_matches_transformers() {
    check_base("llama2_tied");
}

#[test]
fn llama_stored_in_bf16_matches_transformers() {
    check_base("llama_bf16");
}

#[test]
fn llama_with_linear_rope_scaling_matches_transformers() {
    check_base("llama_linear");
}

/// transformers 5 writes `rope_parameters` (rope_theta and the scaling in one object) where 4.x
/// writes `rope_theta` and `rope_scaling`; both layouts of every case give the same model.
#[test]
fn transformers5_config_layouts_match_transformers() {
    let cases = [
        "llama3",
        "llama2_tied",
        "llama_bf16",
        "llama_linear",
        "mistral",
        "mistral_nemo",
        "mistral_nemo_bf16",
        "qwen2",
        "qwen3",
        "phi3",
        "phi3_bf16",
        "gemma2",
        "gemma2_bf16",
        "gemma3",
        "gemma3_bf16",
        "gemma3_mm",
        "gemma3_mm_bf16",
    ];
    for case in cases {
        let v5 = repo()
            .join("tests/fixtures/parity/transformers5_configs")
            .join(format!("{case}.json"));
        assert!(std::fs::read_to_string(&v5)
            .unwrap()
            .contains("\"rope_parameters\""));
        assert_eq!(
            ModelConfig::from_file(&v5).unwrap(),
            ModelConfig::from_file(&case_dir(case).join("config.json")).unwrap(),
            "{case}"
        );
        check_base_with(case, &v5);
    }
}

#[test]
fn mistral_with_sliding_window_matches_transformers() {
    check_base("mistral");
}

/// Mistral-Nemo's shape: heads of 8 with hidden 40 and 4 heads (hidden/heads would be 10; Nemo:
/// 128 of 160), so q_proj is [32, 40] and o_proj [40, 32]; no sliding window (`null`).
#[test]
fn mistral_nemo_with_head_dim_below_hidden_over_heads_matches_transformers() {
    check_base("mistral_nemo");
    let config = load_lm("mistral_nemo").config;
    assert_eq!((config.head_dim, config.sliding_window), (8, None));
}

#[test]
fn mistral_nemo_stored_in_bf16_matches_transformers() {
    check_base("mistral_nemo_bf16");
}

#[test]
fn peft_adapter_on_all_mistral_nemo_projections_matches_peft() {
    check_adapted("mistral_nemo");
}

#[test]
fn peft_reads_a_feinschliff_mistral_nemo_adapter_to_the_same_logits() {
    check_peft_reads_ours("mistral_nemo");
}

#[test]
fn qwen2_with_biases_matches_transformers() {
    check_base("qwen2");
}

/// Qwen2's partial window: use_sliding_window with max_window_layers 1, so only layer 1 slides
/// (window 4 < 12 tokens). Without `layer_types` (older configs) max_window_layers gives the same.
#[test]
fn qwen2_window_on_later_layers_matches_transformers() {
    check_base("qwen2_window");
    let config = ModelConfig::from_file(&case_dir("qwen2_window").join("config.json")).unwrap();
    assert_eq!(config.sliding_layers, Some(vec![false, true]));
    let mut raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(case_dir("qwen2_window").join("config.json")).unwrap(),
    )
    .unwrap();
    raw.as_object_mut().unwrap().remove("layer_types");
    assert_eq!(ModelConfig::from_json(&raw).unwrap(), config);
}

/// Qwen3: per-head q_norm/k_norm before RoPE (norm weights away from 1), head_dim 16 with
/// hidden 32 and 4 heads.
#[test]
fn qwen3_with_head_norms_matches_transformers() {
    check_base("qwen3");
}

#[test]
fn qwen3_stored_in_bf16_matches_transformers() {
    check_base("qwen3_bf16");
}

#[test]
fn peft_adapter_on_all_qwen3_projections_matches_peft() {
    check_adapted("qwen3");
}

#[test]
fn peft_reads_a_feinschliff_qwen3_adapter_to_the_same_logits() {
    check_peft_reads_ours("qwen3");
}

#[test]
fn peft_adapter_on_llama3_matches_peft() {
    check_adapted("llama3");
}

#[test]
fn peft_rslora_all_linear_adapter_on_qwen2_matches_peft() {
    check_adapted("qwen2");
}

/// Phi-3: fused qkv_proj and gate_up_proj, half of each head rotated (partial_rotary_factor 0.5),
/// longrope past an original context of 8 positions (so the 12 tokens use the long factors, with
/// the attention factor on cos and sin).
#[test]
fn phi3_with_fused_projections_and_long_factors_matches_transformers() {
    check_base("phi3");
}

/// Phi-4-mini-like: tied, 6 of 8 dimensions rotated, short factors, bf16 on disk.
#[test]
fn phi3_stored_in_bf16_with_short_factors_matches_transformers() {
    check_base("phi3_bf16");
}

/// PEFT's adapter on the fused modules (qkv_proj, gate_up_proj) as well as o_proj and down_proj.
#[test]
fn peft_adapter_on_fused_phi3_projections_matches_peft() {
    check_adapted("phi3");
}

/// An adapter `feinschliff train` made on the case's model, loaded by PEFT: the same logits here.
fn check_peft_reads_ours(case: &str) {
    let g = candle_core::safetensors::load(
        case_dir(case).join("peft_reads_ours.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut lm = load_lm(case);
    let base = logits(&lm, &g["input_ids"]);
    adapter::load(&case_dir(case).join("feinschliff_adapter"), &Device::Cpu)
        .unwrap()
        .apply(&mut lm)
        .unwrap();
    let ours = logits(&lm, &g["input_ids"]);
    let diff = max_abs_diff(&ours, &g["logits"]);
    assert!(diff <= TOLERANCE, "{case}: max |diff| {diff} against PEFT");
    assert!(max_abs_diff(&base, &ours) > 1e-3);
}

#[test]
fn peft_reads_a_feinschliff_phi3_adapter_to_the_same_logits() {
    check_peft_reads_ours("phi3");
}

/// Gemma 2: GeGLU, (1 + w) gains, four norms per layer, embeddings × √hidden, attention scale
/// query_pre_attn_scalar^−½ with head_dim 16, soft-capped scores and logits, a window of 4 on
/// layer 0 only.
#[test]
fn gemma2_with_soft_caps_and_alternating_window_matches_transformers() {
    check_base("gemma2");
}

#[test]
fn gemma2_stored_in_bf16_matches_transformers() {
    check_base("gemma2_bf16");
}

#[test]
fn peft_adapter_on_all_gemma2_projections_matches_peft() {
    check_adapted("gemma2");
}

/// Trained through the soft-capped head loss and attention: PEFT reads it to the same logits.
#[test]
fn peft_reads_a_feinschliff_gemma2_adapter_to_the_same_logits() {
    check_peft_reads_ours("gemma2");
}

/// Gemma 3 text: (1 + w) q_norm/k_norm per head, a window of 4 with RoPE base 1e4 on layer 0,
/// base 1e6 with linear scaling 8 on the global layer 1, no soft caps.
#[test]
fn gemma3_with_local_and_global_rope_matches_transformers() {
    check_base("gemma3");
}

#[test]
fn gemma3_stored_in_bf16_matches_transformers() {
    check_base("gemma3_bf16");
}

#[test]
fn peft_adapter_on_all_gemma3_projections_matches_peft() {
    check_adapted("gemma3");
}

#[test]
fn peft_reads_a_feinschliff_gemma3_adapter_to_the_same_logits() {
    check_peft_reads_ours("gemma3");
}

/// Gemma 3 multimodal (Gemma3ForConditionalGeneration): its language model, read from the
/// `language_model.model.*` tensors with `text_config`, gives transformers' text logits.
#[test]
fn gemma3_multimodal_language_model_matches_transformers() {
    check_base("gemma3_mm");
}

#[test]
fn gemma3_multimodal_stored_in_bf16_matches_transformers() {
    check_base("gemma3_mm_bf16");
}

/// PEFT's adapter on the language model's 7 projections (`target_modules` a pattern that leaves
/// the vision tower alone).
#[test]
fn peft_adapter_on_the_gemma3_multimodal_language_model_matches_peft() {
    check_adapted("gemma3_mm");
}

/// PEFT loads Feinschliff's adapter into Gemma3ForConditionalGeneration (every tensor, nothing on
/// the vision tower) to the same text logits.
#[test]
fn peft_reads_a_feinschliff_gemma3_multimodal_adapter_to_the_same_logits() {
    check_peft_reads_ours("gemma3_mm");
}
