//! The language model of a multimodal Gemma 3 checkpoint (fixture `gemma3_mm`, made by
//! transformers): both spellings of its tensor names, the vision tower never read, PEFT adapters
//! in both key spellings and with PEFT's inert pairs on the vision tower, trained vision-tower
//! adapters refused, and adapter_config.json's `target_modules` keeping PEFT off the vision tower.

use candle_core::{DType, Device, Tensor};
use feinschliff::model::weights::{save_safetensors, Weights};
use feinschliff::model::{adapter, BaseModel, CausalLm, ModelConfig, TargetModules};
use std::path::Path;

use super::common::{all_linear_lora, max_abs_diff};
use super::parity::{case_dir, golden, load_lm, logits};

/// transformers' module path for each prefix of the fixture's tensor names.
const MODULE_PATHS: [(&str, &str); 4] = [
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
];

fn module_path(name: &str) -> String {
    for (stored, module) in MODULE_PATHS {
        if let Some(rest) = name.strip_prefix(stored) {
            return format!("{module}{rest}");
        }
    }
    name.to_string()
}

fn stored_tensors() -> Vec<(String, Tensor)> {
    let mut tensors: Vec<(String, Tensor)> = candle_core::safetensors::load(
        case_dir("gemma3_mm").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
    .into_iter()
    .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    tensors
}

fn config() -> ModelConfig {
    ModelConfig::from_file(&case_dir("gemma3_mm").join("config.json")).unwrap()
}

/// The language model alone, under both spellings (`language_model.model.*` as transformers saves
/// it, `model.language_model.*` as it names the modules), in memory without the vision tower and
/// projector: the same logits as transformers, so nothing of the vision side is ever read.
#[test]
fn gemma3_language_model_reads_both_spellings_without_the_vision_tower() {
    let g = golden("gemma3_mm");
    let text: Vec<(String, Tensor)> = stored_tensors()
        .into_iter()
        .filter(|(n, _)| n.starts_with("language_model."))
        .collect();
    assert!(text.len() < stored_tensors().len());
    let renamed: Vec<(String, Tensor)> = text
        .iter()
        .map(|(n, t)| (module_path(n), t.clone()))
        .collect();
    for tensors in [text, renamed] {
        let weights = Weights::from_tensors(tensors, DType::F32, &Device::Cpu);
        let lm = CausalLm::load(config(), &weights, &Device::Cpu).unwrap();
        let diff = max_abs_diff(&logits(&lm, &g["input_ids"]), &g["logits"]);
        assert!(diff <= 1e-4, "max |diff| {diff} against transformers");
    }
}

/// A copy of the PEFT adapter `name` of the fixture with its tensors passed through `edit`.
fn edited_adapter(
    name: &str,
    edit: impl Fn(String, Tensor) -> (String, Tensor),
) -> tempfile::TempDir {
    let src = case_dir("gemma3_mm").join(name);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join(adapter::CONFIG_FILE),
        dir.path().join(adapter::CONFIG_FILE),
    )
    .unwrap();
    let mut tensors: Vec<(String, Tensor)> =
        candle_core::safetensors::load(src.join(adapter::WEIGHTS_FILE), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| edit(k, v))
            .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    save_safetensors(&tensors, &dir.path().join(adapter::WEIGHTS_FILE)).unwrap();
    dir
}

fn adapted_diff(adapter_dir: &Path) -> f64 {
    let g = golden("gemma3_mm");
    let mut lm = load_lm("gemma3_mm");
    adapter::load(adapter_dir, &Device::Cpu)
        .unwrap()
        .apply(&mut lm)
        .unwrap();
    max_abs_diff(&logits(&lm, &g["input_ids"]), &g["adapted_logits"])
}

/// PEFT's adapter with the keys transformers before 4.52 gave Gemma3ForConditionalGeneration
/// (`base_model.model.language_model.model.layers...`) applies as the current spelling does.
#[test]
fn peft_adapter_with_the_older_gemma3_key_spelling_matches_peft() {
    let dir = edited_adapter("adapter", |k, v| {
        let old = k.replace(
            "base_model.model.model.language_model.",
            "base_model.model.language_model.model.",
        );
        assert_ne!(old, k);
        (old, v)
    });
    let diff = adapted_diff(dir.path());
    assert!(diff <= 1e-4, "max |diff| {diff} against PEFT");
}

/// PEFT with `target_modules = "all-linear"` also adapts the vision tower; text-only training
/// leaves those pairs at lora_B = 0. They are skipped (PEFT's adapted logits), but a trained one
/// is refused: Feinschliff cannot apply it to a tower it does not load.
#[test]
fn peft_all_linear_adapter_skips_inert_vision_pairs_and_refuses_trained_ones() {
    let diff = adapted_diff(&case_dir("gemma3_mm").join("adapter_all_linear"));
    assert!(diff <= 1e-4, "max |diff| {diff} against PEFT");
    let dir = edited_adapter("adapter_all_linear", |k, v| {
        let trained = k.contains(".vision_tower.") && k.contains("fc1.lora_B");
        let v = if trained { (v + 0.5).unwrap() } else { v };
        (k, v)
    });
    let mut lm = load_lm("gemma3_mm");
    let err = adapter::load(dir.path(), &Device::Cpu)
        .unwrap()
        .apply(&mut lm)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("vision_tower") && err.contains("outside the language model"),
        "{err}"
    );
}

/// An adapter Feinschliff saves for the language model targets it by a pattern that matches its
/// projections in both spellings and none of the vision tower's modules (PEFT matches
/// `target_modules` against the module names of transformers 4.57 and 5.x alike); it loads back.
#[test]
fn saved_gemma3_adapter_targets_the_language_model_only() {
    let mut lm = load_lm("gemma3_mm");
    adapter::attach(&mut lm, &all_linear_lora(4, 8.0, 0.0), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let base = BaseModel {
        dir: case_dir("gemma3_mm"),
        hub_id: Some("google/gemma-3-4b-it".into()),
        revision: None,
    };
    adapter::save(&lm, &all_linear_lora(4, 8.0, 0.0), &base, dir.path()).unwrap();
    let config = adapter::read_config(dir.path()).unwrap();
    let targets: TargetModules = serde_json::from_value(config["target_modules"].clone()).unwrap();
    assert!(matches!(targets, TargetModules::Pattern(_)), "{targets:?}");
    let linears: Vec<String> = lm.linears().into_iter().map(|(n, _)| n).collect();
    assert_eq!(linears.len(), 14);
    for name in &linears {
        assert!(name.starts_with("model.language_model.layers."), "{name}");
        let older = name.replace("model.language_model.", "language_model.model.");
        assert!(targets.matches(name).unwrap() && targets.matches(&older).unwrap());
    }
    // The vision tower's modules as transformers 4.57 (`vision_model.encoder`) and 5.x (`encoder`)
    // name them, among them q_proj, k_proj, v_proj, out_proj, fc1 and fc2.
    let vision: Vec<String> = stored_tensors()
        .into_iter()
        .filter_map(|(n, _)| n.strip_suffix(".weight").map(module_path))
        .filter(|n| !n.starts_with("model.language_model."))
        .collect();
    assert!(vision.iter().any(|n| n.ends_with("self_attn.q_proj")));
    for name in &vision {
        for spelled in [name.clone(), name.replace(".vision_model.", ".")] {
            assert!(!targets.matches(&spelled).unwrap(), "{spelled}");
        }
    }
    let saved =
        candle_core::safetensors::load(dir.path().join(adapter::WEIGHTS_FILE), &Device::Cpu)
            .unwrap();
    assert!(saved
        .keys()
        .all(|k| k.starts_with("base_model.model.model.language_model.layers.")));
    let mut again = load_lm("gemma3_mm");
    adapter::load(dir.path(), &Device::Cpu)
        .unwrap()
        .apply(&mut again)
        .unwrap();
}
