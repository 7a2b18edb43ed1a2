//! Export: merged checkpoints equal base + adapter (PEFT's golden logits), sharding, dtypes, model
//! cards, a multimodal checkpoint's vision tower kept, refused inputs; a recipe that trains,
//! evaluates and writes its card.

use candle_core::{DType, Device, Tensor};
use feinschliff::export::{self, MergeOptions};
use feinschliff::model::weights::Weights;
use feinschliff::model::{CausalLm, ModelConfig, TokenLayout};
use std::path::{Path, PathBuf};

use super::common::{keep_artifact, max_abs_diff, png_pixels, repo, tiny_llama_dir};

fn fixture(case: &str) -> std::path::PathBuf {
    repo().join("tests/fixtures/parity").join(case)
}

/// An export as the command line gives it: the options, `--base` and `--any-base`.
struct Export {
    merge: MergeOptions,
    base: PathBuf,
    any_base: bool,
}

fn options(adapter: &Path, base: &Path, out: &Path) -> Export {
    Export {
        merge: MergeOptions {
            adapter: adapter.to_path_buf(),
            out: out.to_path_buf(),
            dtype: None,
            max_shard_bytes: 5_000_000_000,
            device: "cpu".into(),
            force: false,
            format: feinschliff::export::merged::Format::Safetensors,
        },
        base: base.to_path_buf(),
        any_base: false,
    }
}

/// Locates the base as `feinschliff export --merge` does, then merges.
fn merge(e: &Export) -> anyhow::Result<PathBuf> {
    let base = export::locate_base(
        &e.merge.adapter,
        Some(&e.base.display().to_string()),
        e.any_base,
    )?;
    export::merge(&e.merge, &base)
}

fn logits_of(dir: &Path, ids: &Tensor) -> Tensor {
    let weights = Weights::open(dir, DType::F32, &Device::Cpu).unwrap();
    let lm = CausalLm::load(
        ModelConfig::from_file(&dir.join("config.json")).unwrap(),
        &weights,
        &Device::Cpu,
    )
    .unwrap();
    let ids = ids.to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    lm.forward(&ids, &TokenLayout::causal(b, t), None).unwrap()
}

#[test]
fn merged_export_equals_peft_adapted_logits() {
    let golden =
        candle_core::safetensors::load(fixture("llama3").join("golden.safetensors"), &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&options(
        &fixture("llama3").join("adapter"),
        &fixture("llama3"),
        &out,
    ))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let diff = max_abs_diff(
        &logits_of(&out, &golden["input_ids"]),
        &golden["adapted_logits"],
    );
    assert!(diff <= 1e-4, "merged vs PEFT: {diff}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("library_name: transformers") && card.contains("base_model:merge:"),
        "{card}"
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "float32");
    // The qwen2 rsLoRA adapter on tied embeddings, sharded into small files.
    let mut opts = options(
        &fixture("qwen2").join("adapter"),
        &fixture("qwen2"),
        &dir.path().join("sharded"),
    );
    opts.merge.max_shard_bytes = 40_000;
    merge(&opts).unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("sharded/model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let shards: std::collections::BTreeSet<&str> = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(shards.len() > 2, "{shards:?}");
    let golden =
        candle_core::safetensors::load(fixture("qwen2").join("golden.safetensors"), &Device::Cpu)
            .unwrap();
    let diff = max_abs_diff(
        &logits_of(&dir.path().join("sharded"), &golden["input_ids"]),
        &golden["adapted_logits"],
    );
    assert!(diff <= 1e-4, "sharded qwen2 merge vs PEFT: {diff}");
}

/// Qwen3's merged model keeps its q_norm/k_norm and gives PEFT's adapted logits.
#[test]
fn merged_qwen3_export_equals_peft_adapted_logits() {
    let golden =
        candle_core::safetensors::load(fixture("qwen3").join("golden.safetensors"), &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&options(
        &fixture("qwen3").join("adapter"),
        &fixture("qwen3"),
        &out,
    ))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let diff = max_abs_diff(
        &logits_of(&out, &golden["input_ids"]),
        &golden["adapted_logits"],
    );
    assert!(diff <= 1e-4, "merged qwen3 vs PEFT: {diff}");
    let merged =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert!(merged.contains_key("model.layers.1.self_attn.k_norm.weight"));
}

/// Phi-3's merged model keeps the fused qkv_proj and gate_up_proj (adapter deltas added to the
/// fused matrices, nothing split) and gives PEFT's adapted logits.
#[test]
fn merged_phi3_export_keeps_fused_projections_and_equals_peft() {
    let golden =
        candle_core::safetensors::load(fixture("phi3").join("golden.safetensors"), &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&options(
        &fixture("phi3").join("adapter"),
        &fixture("phi3"),
        &out,
    ))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let diff = max_abs_diff(
        &logits_of(&out, &golden["input_ids"]),
        &golden["adapted_logits"],
    );
    assert!(diff <= 1e-4, "merged phi3 vs PEFT: {diff}");
    let merged =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    let base =
        candle_core::safetensors::load(fixture("phi3").join("model.safetensors"), &Device::Cpu)
            .unwrap();
    let mut names: Vec<&String> = merged.keys().collect();
    names.sort();
    let mut base_names: Vec<&String> = base.keys().collect();
    base_names.sort();
    assert_eq!(names, base_names);
    for fused in ["self_attn.qkv_proj", "mlp.gate_up_proj"] {
        let name = format!("model.layers.0.{fused}.weight");
        assert!(max_abs_diff(&merged[&name], &base[&name]) > 1e-3, "{name}");
    }
}

/// Gemma 2's and Gemma 3's merged models (their (1 + w) norms copied as stored) give PEFT's
/// adapted logits.
#[test]
fn merged_gemma_exports_equal_peft_adapted_logits() {
    for case in ["gemma2", "gemma3"] {
        let golden =
            candle_core::safetensors::load(fixture(case).join("golden.safetensors"), &Device::Cpu)
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("merged");
        merge(&options(
            &fixture(case).join("adapter"),
            &fixture(case),
            &out,
        ))
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
        let diff = max_abs_diff(
            &logits_of(&out, &golden["input_ids"]),
            &golden["adapted_logits"],
        );
        assert!(diff <= 1e-4, "merged {case} vs PEFT: {diff}");
    }
}

/// Mistral-Nemo's merged model keeps its explicit head_dim (q_proj [32, 40] with hidden 40) and
/// gives PEFT's adapted logits; transformers loads it to 4.7e-6 of them (make_parity_fixtures.py).
#[test]
fn merged_mistral_nemo_export_keeps_its_head_dim_and_equals_peft() {
    let golden = candle_core::safetensors::load(
        fixture("mistral_nemo").join("golden.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&options(
        &fixture("mistral_nemo").join("adapter"),
        &fixture("mistral_nemo"),
        &out,
    ))
    .unwrap_or_else(|e| panic!("{e:#}"));
    let diff = max_abs_diff(
        &logits_of(&out, &golden["input_ids"]),
        &golden["adapted_logits"],
    );
    assert!(diff <= 1e-4, "merged mistral_nemo vs PEFT: {diff}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["head_dim"], 8);
    assert!(config["sliding_window"].is_null());
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("pipeline_tag: text-generation\n"), "{card}");
    let merged =
        candle_core::safetensors::load(out.join("model.safetensors"), &Device::Cpu).unwrap();
    assert_eq!(
        merged["model.layers.0.self_attn.q_proj.weight"].dims(),
        &[32, 40]
    );
}

/// Gemma 3 multimodal: the merged checkpoint keeps config.json multimodal and every tensor
/// outside the language model byte for byte (the vision tower and projector, under the base's
/// names), and its text logits are those transformers computed when it loaded the export of the
/// same adapter as Gemma3ForConditionalGeneration (and PEFT's adapted logits).
#[test]
fn merged_gemma3_multimodal_export_keeps_the_vision_tower_and_reads_as_in_transformers() {
    let case = fixture("gemma3_mm");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    merge(&options(&case.join("adapter"), &case, &out)).unwrap_or_else(|e| panic!("{e:#}"));
    // The card tags it as the Hub tags Gemma 3 4B and up; a text model's card says text-generation.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("pipeline_tag: image-text-to-text\n"),
        "{card}"
    );
    let read = |path: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    };
    let (config, base_config) = (
        read(&out.join("config.json")),
        read(&case.join("config.json")),
    );
    for key in [
        "architectures",
        "model_type",
        "text_config",
        "vision_config",
    ] {
        assert_eq!(config[key], base_config[key], "{key}");
    }
    let (merged_bytes, base_bytes) = (
        std::fs::read(out.join("model.safetensors")).unwrap(),
        std::fs::read(case.join("model.safetensors")).unwrap(),
    );
    let merged = safetensors::SafeTensors::deserialize(&merged_bytes).unwrap();
    let base = safetensors::SafeTensors::deserialize(&base_bytes).unwrap();
    let mut names = merged.names();
    names.sort();
    let mut base_names = base.names();
    base_names.sort();
    assert_eq!(names, base_names);
    let others: Vec<&&str> = names
        .iter()
        .filter(|n| !n.starts_with("language_model."))
        .collect();
    assert!(others.iter().any(|n| n.starts_with("vision_tower.")));
    assert!(others
        .iter()
        .any(|n| n.starts_with("multi_modal_projector.")));
    for name in others {
        let (m, b) = (merged.tensor(name).unwrap(), base.tensor(name).unwrap());
        assert_eq!(
            (m.dtype(), m.shape(), m.data()),
            (b.dtype(), b.shape(), b.data()),
            "{name}"
        );
    }
    let q = "language_model.model.layers.0.self_attn.q_proj.weight";
    assert_ne!(
        merged.tensor(q).unwrap().data(),
        base.tensor(q).unwrap().data()
    );
    let transformers = candle_core::safetensors::load(
        case.join("transformers_reads_merged.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let golden =
        candle_core::safetensors::load(case.join("golden.safetensors"), &Device::Cpu).unwrap();
    let ours = logits_of(&out, &transformers["input_ids"]);
    let diff = max_abs_diff(&ours, &transformers["logits"]);
    assert!(
        diff <= 1e-4,
        "merged gemma3_mm vs transformers reading it: {diff}"
    );
    let diff = max_abs_diff(&ours, &golden["adapted_logits"]);
    assert!(diff <= 1e-4, "merged gemma3_mm vs PEFT: {diff}");
}

#[test]
fn merged_export_in_bf16_is_written_as_bf16() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(
        &fixture("llama3").join("adapter"),
        &fixture("llama3"),
        &dir.path().join("bf16"),
    );
    opts.merge.dtype = Some(DType::BF16);
    merge(&opts).unwrap();
    let weights = Weights::open(&dir.path().join("bf16"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(weights.stored_dtype(), Some(DType::BF16));
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("bf16/config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
    let golden =
        candle_core::safetensors::load(fixture("llama3").join("golden.safetensors"), &Device::Cpu)
            .unwrap();
    let diff = max_abs_diff(
        &logits_of(&dir.path().join("bf16"), &golden["input_ids"]),
        &golden["adapted_logits"],
    );
    assert!(diff < 0.1, "bf16 merge far from f32: {diff}");
}

#[test]
fn export_refuses_bad_input_and_keeps_existing_output() {
    let dir = tempfile::tempdir().unwrap();
    // An adapter made for another base (qwen2 adapter on the llama3 base): refused by name, and
    // by shape when the names are overridden but the shapes differ.
    let err = format!(
        "{:#}",
        merge(&options(
            &fixture("qwen2").join("adapter"),
            &fixture("llama3"),
            &dir.path().join("x")
        ))
        .unwrap_err()
    );
    assert!(
        err.contains("was trained on `fixtures/qwen2`") && err.contains("--any-base"),
        "{err}"
    );
    assert!(!dir.path().join("x").exists());
    let mut any = options(
        &fixture("llama3").join("adapter"),
        tiny_llama_dir(),
        &dir.path().join("x"),
    );
    any.any_base = true;
    let err = format!("{:#}", merge(&any).unwrap_err());
    assert!(err.contains("another base model"), "{err}");
    assert!(!dir.path().join("x").exists());
    // An existing output folder.
    let out = dir.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    let err = format!(
        "{:#}",
        merge(&options(
            &fixture("llama3").join("adapter"),
            &fixture("llama3"),
            &out
        ))
        .unwrap_err()
    );
    assert!(err.contains("already exists"), "{err}");
    // DoRA changes the maths: refused with the reason.
    let dora = dir.path().join("dora");
    std::fs::create_dir(&dora).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixture("llama3").join("adapter/adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["use_dora"] = serde_json::json!(true);
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        fixture("llama3").join("adapter/adapter_model.safetensors"),
        dora.join("adapter_model.safetensors"),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        merge(&options(&dora, &fixture("llama3"), &dir.path().join("y"))).unwrap_err()
    );
    assert!(err.contains("DoRA"), "{err}");
    assert!(feinschliff::export::merged::parse_size("5GB").unwrap() == 5_000_000_000);
    assert!(feinschliff::export::merged::parse_size("five").is_err());
}

#[test]
fn recipe_trains_evaluates_and_writes_a_card() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut rows = String::new();
    for i in 0..24 {
        rows.push_str(&serde_json::json!({"instruction": format!("Frage {i}: Wann ist das Kundenzentrum offen?"), "output": format!("Montag bis Freitag, Antwort {i}.")}).to_string());
        rows.push('\n');
    }
    std::fs::write(d.join("train.jsonl"), rows).unwrap();
    std::fs::write(
        d.join("ppl.jsonl"),
        "{\"text\": \"Das Kundenzentrum ist Montag bis Freitag offen.\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("gen.jsonl"),
        "{\"q\": \"Wann ist das Kundenzentrum offen?\", \"a\": \"Montag bis Freitag\"}\n",
    )
    .unwrap();
    std::fs::write(
        d.join("suite.toml"),
        "name = \"domain\"\n[[task]]\nname = \"ppl\"\nkind = \"perplexity\"\ndataset = { path = \"ppl.jsonl\" }\nlicense = \"CC0-1.0\"\ncontext = \"{{ text }}\"\n\n[[task]]\nname = \"gen\"\nkind = \"generate\"\ndataset = { path = \"gen.jsonl\" }\nlicense = \"CC0-1.0\"\ncontext = \"Frage: {{ q }}\\nAntwort:\"\ntarget = \"{{ a }}\"\nmax_gen_toks = 4\n\n[[gate]]\ntask = \"ppl\"\nmetric = \"word_perplexity\"\nmax_drop = 1000000.0\n",
    )
    .unwrap();
    let recipe = format!(
        "[model]\nbase = \"{}\"\n\n[data]\nformat = \"instruction\"\n\n[[data.train]]\npath = \"train.jsonl\"\nlicense = \"CC BY-NC 4.0\"\nnon_commercial = true\n\n[train]\nmax_steps = 4\nlr = 1e-2\ndevice = \"cpu\"\n\n[eval]\nsuites = [\"suite.toml\"]\n\n[output]\ndir = \"out\"\nlicense = \"apache-2.0\"\nlanguage = [\"de\"]\n",
        tiny_llama_dir().display()
    );
    std::fs::write(d.join("recipe.toml"), recipe).unwrap();
    let r = feinschliff::recipe::Recipe::load(&d.join("recipe.toml"), &[]).unwrap();
    feinschliff::pipeline::run(&r, Default::default()).unwrap_or_else(|e| panic!("{e:#}"));
    let out = d.join("out");
    for f in [
        "eval/domain/results.json",
        "eval/domain/base_results.json",
        "eval/domain/report.md",
        "README.md",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for want in [
        "library_name: peft",
        "base_model: \"",
        "- base_model:adapter:",
        "- lora",
        "language:\n- de",
        "license: \"apache-2.0\"",
        "model-index:",
        "type: word_perplexity",
        "⚠ non-commercial",
        "| ppl | word_perplexity |",
    ] {
        assert!(card.contains(want), "card lacks `{want}`:\n{card}");
    }
    // The eval chart: eval_chart.json holds exactly the values and stderrs of both results files,
    // eval.svg draws one base and one adapted bar per row, and the card and report.md show it.
    let results = |f: &str| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(out.join("eval/domain").join(f)).unwrap())
            .unwrap()
    };
    let (adapted, base) = (results("results.json"), results("base_results.json"));
    let rows: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(out.join("eval/domain/eval_chart.json")).unwrap(),
    )
    .unwrap();
    assert!(!rows.is_empty());
    for row in &rows {
        let (task, metric) = (
            row["task"].as_str().unwrap(),
            row["metric"].as_str().unwrap(),
        );
        for (side, results) in [("adapted", &adapted), ("base", &base)] {
            let measured = &results["results"][task];
            assert_eq!(
                row[side]["value"],
                measured[format!("{metric},none")],
                "{task} {metric} {side}"
            );
            let stderr = &measured[format!("{metric}_stderr,none")];
            if stderr.is_number() {
                assert_eq!(
                    &row[side]["stderr"], stderr,
                    "{task} {metric} {side} stderr"
                );
            }
        }
    }
    let svg = std::fs::read_to_string(out.join("eval/domain/eval.svg")).unwrap();
    assert!(
        svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\"") && svg.ends_with("</svg>\n")
    );
    let bars = svg.matches("<rect x=").count() - 2; // the legend's two swatches
    assert_eq!(bars, 2 * rows.len(), "{svg}");
    // eval.png: the same chart at the SVG's size, drawn, kept for a person to look at.
    let size = |attr: &str| -> u32 {
        let at = svg.find(&format!(" {attr}=\"")).unwrap() + attr.len() + 3;
        svg[at..at + svg[at..].find('"').unwrap()].parse().unwrap()
    };
    let (width, height, inked) = png_pixels(&out.join("eval/domain/eval.png"));
    assert_eq!((width, height), (size("width"), size("height")));
    assert!(inked > 2_000, "eval.png looks blank: {inked} pixels drawn");
    keep_artifact(&out.join("eval/domain/eval.png"), "eval.png");
    assert!(card.contains("](eval/domain/eval.svg)"), "{card}");
    let md = std::fs::read_to_string(out.join("eval/domain/report.md")).unwrap();
    assert!(md.contains("](eval.svg)"), "{md}");
    // report.html: curves, data, eval with deltas, gates, sample answers, recipe; self-contained.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    for want in [
        "<h2>Training curves</h2>\n<svg",
        "<h2>Data</h2>",
        "<h2>Evaluation: domain</h2>",
        "<td>ppl</td><td>word_perplexity</td>",
        "<text x=\"10\" y=\"18\" font-size=\"15\">Evaluation: domain</text>",
        "<span class=\"pass\">passed</span>",
        "<h3>Sample answers: gen</h3>",
        "Montag bis Freitag",
        "max_steps = 4",
    ] {
        assert!(html.contains(want), "report.html lacks `{want}`");
    }
    for banned in ["<script", "<link", "src=\"http", "href=\"http", "url(http"] {
        assert!(
            !html.contains(banned),
            "report.html is not self-contained: {banned}"
        );
    }
    // A merged export carries the card with the charts it links.
    let merged_dir = merge(&options(&out, tiny_llama_dir(), &d.join("merged"))).unwrap();
    let merged_card = std::fs::read_to_string(merged_dir.join("README.md")).unwrap();
    for png in ["loss.png", "eval/domain/eval.png"] {
        assert!(merged_dir.join(png).is_file(), "{png} not beside the card");
    }
    for chart in ["loss.svg", "eval/domain/eval.svg"] {
        assert!(
            merged_card.contains(&format!("]({chart})")),
            "{merged_card}"
        );
        assert!(
            merged_dir.join(chart).is_file(),
            "{chart} missing beside the merged card"
        );
    }
    // A gate that cannot pass fails the run after the reports and the card are written.
    let failing = r.clone();
    let mut failing = failing;
    failing.output.dir = "out2".into();
    let suite = std::fs::read_to_string(d.join("suite.toml"))
        .unwrap()
        .replace("max_drop = 1000000.0", "max = 1.0");
    std::fs::write(d.join("suite.toml"), suite).unwrap();
    let err = format!(
        "{:#}",
        feinschliff::pipeline::run(&failing, Default::default()).unwrap_err()
    );
    assert!(
        err.contains("ppl word_perplexity") && err.contains("above the maximum 1"),
        "{err}"
    );
    assert!(d.join("out2/eval/domain/junit.xml").exists());
    let html = std::fs::read_to_string(d.join("out2/report.html")).unwrap();
    assert!(html.contains("<span class=\"fail\">failed</span>"));
}
