//! `model new --arch` for the families beyond Llama: checkpoints at the tiny and smol sizes that
//! load, hold exactly the tensors the family's layout names, and run; and each such family through
//! the command line: train, inspect, eval and export --merge (Gemma 3 multimodal too, from its
//! transformers-made fixture, which `model new` does not write).

use candle_core::{DType, Device, Tensor};
use feinschliff::model::new::{create, Size};
use feinschliff::model::{layout, Model, TokenLayout};

/// Writes `arch` at `size` (with heads `head_dim` wide when given), loads it and runs 6 tokens;
/// returns the loaded model.
fn new_model(arch: &str, size: Size, head_dim: Option<usize>) -> Model {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join(arch);
    create(arch, size, head_dim, 1, &out, false).unwrap_or_else(|e| panic!("{arch}: {e:#}"));
    let model = Model::load(&out, None, &Device::Cpu).unwrap();
    let stored =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let elements: usize = stored.values().map(|t| t.elem_count()).sum();
    assert_eq!(
        elements,
        layout::parameter_count(&model.lm.config),
        "{arch}"
    );
    let ids = Tensor::new(&[[1u32, 5, 9, 3, 7, 2]], &Device::Cpu).unwrap();
    let logits = model
        .lm
        .forward(&ids, &TokenLayout::causal(1, 6), None)
        .unwrap();
    let max = logits
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert!(max.is_finite() && max > 0.0, "{arch}: logits {max}");
    model
}

#[test]
fn model_new_phi3_at_tiny_and_smol_size() {
    for size in [Size::Tiny, Size::Smol] {
        let model = new_model("phi3", size, None);
        let c = &model.lm.config;
        assert!(c.fused_projections);
        assert_eq!(
            c.rotary_dim * 4,
            c.head_dim * 3,
            "partial_rotary_factor 0.75"
        );
        let names: Vec<String> = model.lm.linears().into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"model.layers.0.self_attn.qkv_proj".to_string()));
        assert!(names.contains(&"model.layers.0.mlp.gate_up_proj".to_string()));
        assert!(!names
            .iter()
            .any(|n| n.ends_with("q_proj") || n.ends_with("gate_proj")));
    }
}

/// Qwen3: RMSNorm per query and key head (their weights in the checkpoint), no attention biases,
/// rope_theta 1e6, no window.
#[test]
fn model_new_qwen3_at_tiny_and_smol_size() {
    for size in [Size::Tiny, Size::Smol] {
        let model = new_model("qwen3", size, None);
        let c = &model.lm.config;
        assert!(c.qk_norm && !c.qkv_bias && !c.o_bias);
        assert_eq!(c.head_dim, size.shape().hidden / size.shape().heads);
        assert_eq!((c.rope_theta, c.sliding_window), (1_000_000.0, None));
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("qwen3");
    create("qwen3", Size::Tiny, None, 1, &out, false).unwrap();
    let stored =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let head_dim = Size::Tiny.shape().hidden / Size::Tiny.shape().heads;
    for norm in ["q_norm", "k_norm"] {
        let name = format!("model.layers.0.self_attn.{norm}.weight");
        assert_eq!(stored[&name].dims(), &[head_dim], "{name}");
    }
}

#[test]
fn model_new_gemma2_at_tiny_and_smol_size() {
    for size in [Size::Tiny, Size::Smol] {
        let model = new_model("gemma2", size, None);
        let c = &model.lm.config;
        assert!(c.sandwich_norms && c.norm_gain_offset && c.scale_embeddings);
        assert!(c.tie_word_embeddings);
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        let sliding = c.sliding_layers.clone().unwrap();
        assert!(sliding[0] && !sliding[1], "{sliding:?}");
    }
}

/// Gemma 3 text at smol size (30 layers): every sixth layer global, the others sliding with the
/// local RoPE base.
#[test]
fn model_new_gemma3_text_at_tiny_and_smol_size() {
    for size in [Size::Tiny, Size::Smol] {
        let model = new_model("gemma3_text", size, None);
        let c = &model.lm.config;
        assert!(c.qk_norm && c.sandwich_norms && c.norm_gain_offset);
        assert_eq!(c.local_rope_theta, Some(10_000.0));
        assert_eq!(c.rope_theta, 1_000_000.0);
        let sliding = c.sliding_layers.clone().unwrap();
        let global: Vec<usize> = (0..sliding.len()).filter(|&i| !sliding[i]).collect();
        let want: Vec<usize> = (0..sliding.len()).filter(|i| (i + 1) % 6 == 0).collect();
        assert_eq!(global, want);
    }
}

/// Mistral as Mistral 7B has it (head_dim = hidden / heads, no window) and, with `head_dim`, as
/// Mistral-Nemo: narrower heads than hidden / heads (tiny: 12 of 16; smol: 48 of 64), so q_proj
/// maps hidden to heads × head_dim and o_proj back.
#[test]
fn model_new_mistral_and_nemo_shape_at_tiny_and_smol_size() {
    for (size, nemo_head_dim) in [(Size::Tiny, 12), (Size::Smol, 48)] {
        let shape = size.shape();
        let plain = new_model("mistral", size, None);
        assert_eq!(plain.lm.config.head_dim, shape.hidden / shape.heads);
        assert_eq!(plain.lm.config.sliding_window, None);
        let nemo = new_model("mistral", size, Some(nemo_head_dim));
        let c = &nemo.lm.config;
        assert_eq!((c.head_dim, c.rotary_dim), (nemo_head_dim, nemo_head_dim));
        let linears = nemo.lm.linears();
        let shape_of = |name: &str| {
            let (_, l) = linears.iter().find(|(n, _)| n == name).unwrap();
            (l.out_features(), l.in_features())
        };
        let q = shape.heads * nemo_head_dim;
        let kv = shape.kv_heads * nemo_head_dim;
        assert_eq!(
            shape_of("model.layers.1.self_attn.q_proj"),
            (q, shape.hidden)
        );
        assert_eq!(
            shape_of("model.layers.1.self_attn.k_proj"),
            (kv, shape.hidden)
        );
        assert_eq!(
            shape_of("model.layers.1.self_attn.o_proj"),
            (shape.hidden, q)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let err = create(
        "mistral",
        Size::Tiny,
        Some(7),
        1,
        &dir.path().join("odd"),
        false,
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("head_dim"), "{err:#}");
    assert!(!dir.path().join("odd").exists());
}

/// Runs the binary in `dir`, which must succeed; returns what it printed on stdout.
fn feinschliff(args: &[&str], dir: &std::path::Path) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "feinschliff {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Qwen3, Phi-3, Gemma 2, Gemma 3 and a Mistral-Nemo-shaped Mistral (`--head-dim`) through the
/// binary:
/// `model new`, `train` (gradient checkpointing on, LoRA on every projection), `model inspect
/// --adapter`, `eval` with the adapter (perplexity and generation), `export --merge`, and `model
/// inspect` of the merged model.
#[test]
fn new_families_train_evaluate_and_export_from_the_command_line() {
    let families: [&[&str]; 5] = [
        &["qwen3"],
        &["phi3"],
        &["gemma2"],
        &["gemma3_text"],
        &["mistral", "--head-dim", "12"],
    ];
    for arch in families {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        feinschliff(
            &[&["model", "new", "--arch"], arch, &["--out", "base"]].concat(),
            d,
        );
        let lines: String = (0..16)
            .map(|i| {
                let row = serde_json::json!({
                    "prompt": format!("Frage {i}: Wann ist das Kundenzentrum offen?\nAntwort:"),
                    "completion": format!(" Montag bis Freitag ab {} Uhr.", 7 + i % 3),
                });
                format!("{row}\n")
            })
            .collect();
        std::fs::write(d.join("train.jsonl"), lines).unwrap();
        let recipe = r#"
[model]
base = "base"

[lora]
r = 4
alpha = 8
target_modules = "all-linear"

[data]
format = "completion"
max_seq_len = 48
validation_fraction = 0.0

[[data.train]]
path = "train.jsonl"

[train]
batch_size = 4
max_steps = 3
gradient_checkpointing = true
device = "cpu"

[output]
dir = "adapter"
"#;
        std::fs::write(d.join("recipe.toml"), recipe).unwrap();
        let suite = r#"name = "smoke"
max_length = 32

[[task]]
name = "ppl"
kind = "perplexity"
dataset = { path = "train.jsonl" }
license = "CC0-1.0"
context = "{{ prompt }}{{ completion }}"

[[task]]
name = "answer"
kind = "generate"
dataset = { path = "train.jsonl" }
license = "CC0-1.0"
context = "{{ prompt }}"
target = "{{ completion }}"
until = ["\n"]
max_gen_toks = 4
"#;
        std::fs::write(d.join("suite.toml"), suite).unwrap();
        feinschliff(&["train", "recipe.toml"], d);
        feinschliff(&["model", "inspect", "base", "--adapter", "adapter"], d);
        let eval = [
            "eval",
            "--model",
            "base",
            "--adapter",
            "adapter",
            "--suite",
            "suite.toml",
            "--limit",
            "2",
            "--out",
            "eval",
            "--device",
            "cpu",
        ];
        feinschliff(&eval, d);
        let merge = [
            "export",
            "--merge",
            "--adapter",
            "adapter",
            "--base",
            "base",
            "--any-base",
            "--out",
            "merged",
            "--device",
            "cpu",
        ];
        feinschliff(&merge, d);
        feinschliff(&["model", "inspect", "merged"], d);
    }
}

/// Gemma 3 multimodal through the binary, from the `gemma3_mm` fixture with the word-level
/// tokenizer of tests/fixtures/training/model: `model inspect` says what it is, `train` adapts the
/// language model (all-linear: its 14 projections, none of the vision tower), `export --merge`
/// writes a model that inspects alike. `model new` refuses the family.
#[test]
fn gemma3_multimodal_trains_inspects_and_exports_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = d.join("base");
    std::fs::create_dir(&base).unwrap();
    let repo = super::common::repo().join("tests/fixtures");
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(repo.join("parity/gemma3_mm").join(f), base.join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(repo.join("training/model").join(f), base.join(f)).unwrap();
    }
    let inspect = feinschliff(&["model", "inspect", "base"], d);
    assert!(
        inspect.contains("family       gemma3\n")
            && inspect.contains("multimodal   Gemma3ForConditionalGeneration")
            && inspect.contains("(34 tensors, 6032 parameters) stay on disk"),
        "{inspect}"
    );
    let rows: String = (0..8)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"text": format!("das ist ein Satz {i}")})
            )
        })
        .collect();
    std::fs::write(d.join("train.jsonl"), rows).unwrap();
    let recipe = r#"
[model]
base = "base"

[lora]
r = 4
alpha = 8
target_modules = "all-linear"

[data]
format = "text"
max_seq_len = 16
validation_fraction = 0.0

[[data.train]]
path = "train.jsonl"

[train]
batch_size = 4
max_steps = 2
device = "cpu"

[output]
dir = "adapter"
"#;
    std::fs::write(d.join("recipe.toml"), recipe).unwrap();
    feinschliff(&["train", "recipe.toml"], d);
    let adapted = feinschliff(&["model", "inspect", "base", "--adapter", "adapter"], d);
    assert!(
        adapted.contains(
            "on down_proj,gate_proj,k_proj,o_proj,q_proj,up_proj,v_proj; 4864 trainable parameters"
        ),
        "{adapted}"
    );
    let merge = [
        "export",
        "--merge",
        "--adapter",
        "adapter",
        "--base",
        "base",
        "--out",
        "merged",
        "--device",
        "cpu",
    ];
    feinschliff(&merge, d);
    let merged = feinschliff(&["model", "inspect", "merged"], d);
    assert!(merged.contains("stay on disk"), "{merged}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["model", "new", "--arch", "gemma3", "--out", "new"])
        .current_dir(d)
        .output()
        .unwrap();
    assert!(!out.status.success());
}
