//! GGUF in: logits equal transformers' on F32/F16/BF16 files and on quantized ones (built from
//! gguf-py's dequantisation), weights equal gguf-py's dequantisation exactly, tokenizers equal
//! transformers' GGUF tokenizers, and broken files are clear errors without a panic or output.
//! Fixtures: tests/fixtures/gguf, made by tests/fixtures/gguf/make_gguf_fixtures.py.

use candle_core::{DType, Device, Tensor};
use feinschliff::export::merged::Format;
use feinschliff::model::gguf::Quant;
use feinschliff::model::{Model, Parts, TokenLayout};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::common::{assert_tokenizes_as, max_abs_diff, repo};

const TOLERANCE: f64 = 1e-4;

fn fixtures() -> PathBuf {
    repo().join("tests/fixtures/gguf")
}

fn model_path(case: &str) -> PathBuf {
    fixtures().join(case).join("model.gguf")
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Max |logits - transformers' logits| on the case's golden input ids.
fn logits_diff(case: &str) -> f64 {
    let golden = candle_core::safetensors::load(
        fixtures().join(case).join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let model = Model::load(&model_path(case), None, &Device::Cpu).unwrap();
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let logits = model
        .lm
        .forward(&ids, &TokenLayout::causal(b, t), None)
        .unwrap();
    max_abs_diff(&logits, &golden["logits"])
}

#[test]
fn gguf_f16_f32_bf16_logits_equal_transformers() {
    for case in ["llama_spm_f16", "qwen2_bpe_f32", "qwen3_bpe_bf16"] {
        let diff = logits_diff(case);
        assert!(diff <= TOLERANCE, "{case}: max |diff| {diff}");
    }
}

#[test]
fn gguf_quantized_weights_equal_gguf_py_and_logits_equal_transformers() {
    let parts = Parts::open(&model_path("llama_quant"), DType::F32, &Device::Cpu).unwrap();
    let expected = json(&fixtures().join("llama_quant/weights.json"));
    let expected = expected.as_object().unwrap();
    assert_eq!(parts.weights.names().len(), expected.len());
    let mut types: Vec<&str> = Vec::new();
    for (name, want) in expected {
        let shape = parts.weights.shape_of(name).unwrap();
        let t: Tensor = parts.weights.get(name, &shape).unwrap();
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let hash: String = Sha256::digest(&bytes)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            hash,
            want["sha256"].as_str().unwrap(),
            "{name} ({}): first values {:?}, gguf-py's {}",
            want["type"],
            &values[..4],
            want["first"]
        );
        types.push(want["type"].as_str().unwrap());
    }
    for t in [
        "F32", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K",
    ] {
        assert!(types.contains(&t), "the fixture lacks {t}");
    }
    assert!(parts.storage.contains("Q4_K ×1"), "{}", parts.storage);
    let diff = logits_diff("llama_quant");
    assert!(diff <= TOLERANCE, "llama_quant: max |diff| {diff}");
}

#[test]
fn gguf_tokenizers_equal_transformers() {
    let golden = json(&fixtures().join("tokenization.json"));
    for (case, want) in golden.as_object().unwrap() {
        let t = Parts::open(&model_path(case), DType::F32, &Device::Cpu)
            .unwrap()
            .tokenizer
            .unwrap();
        assert_tokenizes_as(&t, want, case);
    }
    let qwen2 = Parts::open(&model_path("qwen2_bpe_f32"), DType::F32, &Device::Cpu).unwrap();
    assert!(qwen2
        .tokenizer
        .unwrap()
        .chat_template
        .as_deref()
        .is_some_and(|t| t.contains("<|im_start|>")));
}

#[test]
fn gguf_base_is_located_and_inspected() {
    let path = model_path("llama_quant");
    let base = feinschliff::model::locate(path.to_str().unwrap(), &path, None, None).unwrap();
    assert_eq!(base.dir, path);
    let out = Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["model", "inspect", path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("family       llama") && text.contains("GGUF") && text.contains("Q6_K ×1"),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args([
            "chat",
            "--model",
            model_path("qwen2_bpe_f32").to_str().unwrap(),
        ])
        .args(["--prompt", "Hallo", "--max-new-tokens", "3"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn training_on_a_bad_gguf_base_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), "llama_spm_f16");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let bad = fixtures().join("bad_shape.gguf");
    let text = text.replace(
        &model_path("llama_spm_f16").display().to_string(),
        &bad.display().to_string(),
    );
    std::fs::write(&recipe, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["train", recipe.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("bad_shape.gguf") && err.contains("llama.feed_forward_length"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

/// `model inspect FILE --logits-out OUT` fails naming the file and all of `needles`, without a
/// panic and without writing OUT.
fn refused(file: &Path, needles: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("logits.safetensors");
    let out = Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["model", "inspect", file.to_str().unwrap()])
        .args(["--text", "Hallo", "--logits-out", logits.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}: accepted", file.display());
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains(&file.display().to_string()), "{err}");
    for n in needles {
        assert!(err.contains(n), "`{n}` not in: {err}");
    }
    assert!(!logits.exists(), "output written for {}", file.display());
}

#[test]
fn bad_gguf_files_are_clear_errors() {
    refused(
        &fixtures().join("bad_arch.gguf"),
        &["general.architecture", "gptneox"],
    );
    refused(
        &fixtures().join("bad_shape.gguf"),
        &["blk.0.ffn_gate.weight", "llama.feed_forward_length"],
    );
    refused(&fixtures().join("bad_type.gguf"), &["storage type 99"]);
}

#[test]
fn truncated_gguf_files_are_clear_errors() {
    let bytes = std::fs::read(model_path("qwen2_bpe_f32")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // In the header's counts, in the metadata (the tokenizer's arrays), in the tensor data.
    for cut in [6, 500, 5_000, 15_000, 25_000, 100_000, bytes.len() - 1] {
        let path = dir.path().join(format!("cut-{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        refused(&path, &["truncated"]);
    }
    let path = dir.path().join(format!("cut-{}.gguf", bytes.len() - 1));
    refused(&path, &["truncated", "output_norm.weight"]);
}

/// A recipe training a few steps on the GGUF `case` in `dir`.
fn write_recipe(dir: &Path, case: &str) -> PathBuf {
    let mut lines = String::new();
    for i in 0..16 {
        let row = serde_json::json!({
            "prompt": format!("Frage {i}: Wo liegt das Kundenzentrum?\nAntwort:"),
            "completion": format!(" Am Marktplatz {i}."),
        });
        lines.push_str(&format!("{row}\n"));
    }
    std::fs::write(dir.join("train.jsonl"), lines).unwrap();
    let recipe = format!(
        r#"
[model]
base = "{}"

[lora]
r = 4
alpha = 8

[data]
format = "completion"
max_seq_len = 48

[[data.train]]
path = "train.jsonl"

[train]
batch_size = 4
lr = 1e-2
max_steps = 4
seed = 1
device = "cpu"

[output]
dir = "out"
"#,
        model_path(case).display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe).unwrap();
    path
}

#[test]
fn adapter_trained_on_a_gguf_base_has_peft_names_and_applies_to_the_hf_checkpoint_and_merges() {
    let dir = tempfile::tempdir().unwrap();
    let recipe =
        feinschliff::recipe::Recipe::load(&write_recipe(dir.path(), "llama_spm_f16"), &[]).unwrap();
    let base = recipe.locate_base().unwrap();
    let options = feinschliff::train::RunOptions {
        force: false,
        resume: false,
    };
    feinschliff::train::run(&recipe, &base, options).unwrap();
    let adapter = dir.path().join("out");
    let config = json(&adapter.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], "model.gguf");
    let tensors =
        candle_core::safetensors::load(adapter.join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(
        tensors.contains_key("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{:?}",
        tensors.keys().collect::<Vec<_>>()
    );
    // The same weights as a transformers checkpoint (what convert_hf_to_gguf.py started from).
    let hf = dir.path().join("hf");
    std::fs::create_dir(&hf).unwrap();
    let parts = Parts::open(&model_path("llama_spm_f16"), DType::F32, &Device::Cpu).unwrap();
    let weights: Vec<(String, Tensor)> = parts
        .weights
        .names()
        .into_iter()
        .map(|n| {
            let t = parts.weights.get(&n, &parts.weights.shape_of(&n).unwrap());
            (n, t.unwrap())
        })
        .collect();
    feinschliff::model::weights::save_safetensors(&weights, &hf.join("model.safetensors")).unwrap();
    std::fs::write(hf.join("config.json"), parts.config_json.to_string()).unwrap();
    std::fs::write(
        hf.join("tokenizer.json"),
        parts
            .tokenizer
            .as_ref()
            .unwrap()
            .inner
            .to_string(false)
            .unwrap(),
    )
    .unwrap();
    let ids = Tensor::new(&[[1u32, 410, 455, 417, 411, 410, 448]], &Device::Cpu).unwrap();
    let logits = |path: &Path| {
        let mut model = Model::load(path, None, &Device::Cpu).unwrap();
        model.load_adapter(&adapter).unwrap();
        model
            .lm
            .forward(&ids, &TokenLayout::causal(1, 7), None)
            .unwrap()
    };
    let adapted = logits(&model_path("llama_spm_f16"));
    let diff = max_abs_diff(&adapted, &logits(&hf));
    assert!(diff <= 1e-6, "adapter on GGUF vs on HF checkpoint: {diff}");
    // Merged into the GGUF base: a transformers checkpoint with the GGUF's tokenizer.
    let merged = dir.path().join("merged");
    let opts = feinschliff::export::MergeOptions {
        adapter: adapter.clone(),
        out: merged.clone(),
        dtype: None,
        max_shard_bytes: 5_000_000_000,
        device: "cpu".into(),
        force: false,
        format: feinschliff::export::merged::Format::Safetensors,
    };
    feinschliff::export::merge(&opts, &base).unwrap();
    let model = Model::load(&merged, None, &Device::Cpu).unwrap();
    let merged_logits = model
        .lm
        .forward(&ids, &TokenLayout::causal(1, 7), None)
        .unwrap();
    let diff = max_abs_diff(&adapted, &merged_logits);
    assert!(diff <= 1e-5, "merged vs adapted GGUF: {diff}");
    let text = "Größere Straßen führen über die Brücke.";
    assert_eq!(
        model.tokenizer.encode_with_special_tokens(text).unwrap(),
        parts
            .tokenizer
            .as_ref()
            .unwrap()
            .encode_with_special_tokens(text)
            .unwrap()
    );
    assert_eq!(model.tokenizer.eos_token.as_deref(), Some("</s>"));
}

/// Trains a few steps on the GGUF `case` and merges: safetensors (f32) and GGUF with `quant`.
fn train_and_merge(dir: &Path, case: &str, quant: Quant) -> (PathBuf, PathBuf) {
    let recipe = feinschliff::recipe::Recipe::load(&write_recipe(dir, case), &[]).unwrap();
    let base = recipe.locate_base().unwrap();
    let options = feinschliff::train::RunOptions {
        force: false,
        resume: false,
    };
    feinschliff::train::run(&recipe, &base, options).unwrap();
    let merge = |out: &str, format: Format| {
        let opts = feinschliff::export::MergeOptions {
            adapter: dir.join("out"),
            out: dir.join(out),
            // --dtype applies to safetensors only; GGUF's types come from the quantisation.
            dtype: matches!(format, Format::Safetensors).then_some(DType::F32),
            max_shard_bytes: 5_000_000_000,
            device: "cpu".into(),
            force: false,
            format,
        };
        feinschliff::export::merge(&opts, &base).unwrap()
    };
    let refused = feinschliff::export::MergeOptions {
        adapter: dir.join("out"),
        out: dir.join("refused"),
        dtype: Some(DType::BF16),
        max_shard_bytes: 5_000_000_000,
        device: "cpu".into(),
        force: false,
        format: Format::Gguf(quant),
    };
    let err = format!(
        "{:#}",
        feinschliff::export::merge(&refused, &base).unwrap_err()
    );
    assert!(
        err.contains("--quant") && !dir.join("refused").exists(),
        "{err}"
    );
    let hf = merge("merged", Format::Safetensors);
    let gguf =
        merge("merged-gguf", Format::Gguf(quant)).join(format!("model-{}.gguf", quant.name()));
    (hf, gguf)
}

#[test]
fn merged_gguf_export_reads_back_within_the_round_trip_error_with_its_tokenizer() {
    for (case, quant) in [
        ("llama_spm_f16", Quant::Q8_0),
        ("qwen2_bpe_f32", Quant::F16),
        ("llama_quant", Quant::Q4KM),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (hf, gguf) = train_and_merge(dir.path(), case, quant);
        let want = Parts::open(&hf, DType::F32, &Device::Cpu).unwrap();
        let got = Parts::open(&gguf, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(got.config, want.config, "{case}");
        if quant == Quant::Q4KM {
            // down_proj rows hold one 256-value block: Q4_K, or Q6_K in the layers given more bits.
            assert!(
                got.storage.contains("Q4_K") && got.storage.contains("Q6_K"),
                "{}",
                got.storage
            );
        }
        assert_eq!(got.weights.names(), want.weights.names(), "{case}");
        for name in want.weights.names() {
            let shape = want.weights.shape_of(&name).unwrap();
            let w = want.weights.get(&name, &shape).unwrap();
            let g = got.weights.get(&name, &shape).unwrap();
            let err = max_abs_diff(&w, &g);
            let max = w
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            // F16 rounds to 11 significant bits; Q8_0 to half a step of (block max)/127, plus the
            // rounding of that step to f16 (up to 127 steps of 2^-11 relative).
            let bound = match (shape.len(), quant) {
                (1, _) => 0.0,
                (_, Quant::F16) => max * 2f64.powi(-11),
                (_, Quant::Q8_0) => max * (1.0 / 254.0 + 2f64.powi(-11)),
                // Q4_K: 16 levels per sub-block with 6-bit scale and minimum; Q5_0/Q6_K are finer.
                (_, Quant::Q4KM) => max / 8.0,
            };
            assert!(err <= bound, "{case} {name}: {err} > {bound}");
        }
        let (want, got) = (want.tokenizer.unwrap(), got.tokenizer.unwrap());
        for text in ["Die Würde des Menschen ist unantastbar.", "Größe: 1.234 m"] {
            assert_eq!(
                got.encode_with_special_tokens(text).unwrap(),
                want.encode_with_special_tokens(text).unwrap(),
                "{case}: {text}"
            );
        }
        assert_eq!(got.bos_token, want.bos_token, "{case}");
        assert_eq!(got.eos_token, want.eos_token, "{case}");
        assert_eq!(got.chat_template, want.chat_template, "{case}");
    }
}

/// llama.cpp splits text before the merges as `tokenizer.ggml.pre` names it. A lone ByteLevel
/// pre-tokenizer with its regex (GPT-2's split, as `model new` writes it) is "gpt-2": under
/// `default`, llama.cpp split " 12,50" into " ", "1", "2", ... where tokenizer.json keeps " 12"
/// (found with scripts/llama_cpp_gguf_check.py).
#[test]
fn gguf_of_a_gpt2_style_tokenizer_names_its_split_for_llama_cpp() {
    let parts = Parts::open(super::common::tiny_llama_dir(), DType::F32, &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = parts
        .weights
        .names()
        .into_iter()
        .map(|name| {
            let shape = parts.weights.shape_of(&name).unwrap();
            let t = parts.weights.get(&name, &shape).unwrap();
            (name, t)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("tiny.gguf");
    let tokenizer = parts.tokenizer.as_ref().unwrap();
    feinschliff::model::gguf::write(&file, "tiny", &parts.config, tokenizer, tensors, Quant::F16)
        .unwrap_or_else(|e| panic!("{e:#}"));
    let mut reader = std::fs::File::open(&file).unwrap();
    let content = candle_core::quantized::gguf_file::Content::read(&mut reader).unwrap();
    let pre = content.metadata["tokenizer.ggml.pre"].to_string().unwrap();
    assert_eq!(pre, "gpt-2");
    // Read back here, the file tokenizes as tokenizer.json does.
    let back = Parts::open(&file, DType::F32, &Device::Cpu).unwrap();
    let text = "Die Grundgebühr beträgt 12,50 € im Monat.";
    assert_eq!(
        back.tokenizer
            .unwrap()
            .encode_with_special_tokens(text)
            .unwrap(),
        tokenizer.encode_with_special_tokens(text).unwrap()
    );
}
