//! End-to-end training on a tiny model made by the tool: loss falls, runs repeat bit for bit,
//! output folders are never half-written or overwritten.

use std::path::Path;

use super::common::{keep_artifact, png_pixels, tiny_llama_dir};

/// A small prompt/completion set with learnable structure.
pub(super) fn write_dataset(dir: &Path) {
    let cities = [
        "Berlin", "Hamburg", "München", "Köln", "Leipzig", "Dresden", "Bremen", "Kiel",
    ];
    let mut lines = String::new();
    for round in 0..6 {
        for (i, c) in cities.iter().enumerate() {
            let prompt = format!("Frage {round}-{i}: Wo liegt das Kundenzentrum in {c}?\nAntwort:");
            let completion = format!(" Das Kundenzentrum in {c} liegt am Marktplatz {}.", i + 1);
            lines.push_str(
                &serde_json::json!({"prompt": prompt, "completion": completion}).to_string(),
            );
            lines.push('\n');
        }
    }
    std::fs::write(dir.join("train.jsonl"), lines).unwrap();
}

fn write_recipe(dir: &Path) -> std::path::PathBuf {
    let recipe = format!(
        r#"
[model]
base = "{}"

[lora]
r = 8
alpha = 16
dropout = 0.1

[data]
format = "completion"
max_seq_len = 64
validation_fraction = 0.1

[[data.train]]
path = "train.jsonl"

[train]
batch_size = 4
gradient_accumulation = 2
lr = 1e-2
warmup_steps = 2
max_steps = 25
eval_every = 10
seed = 3
device = "cpu"

[output]
dir = "out"
"#,
        tiny_llama_dir().display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe).unwrap();
    path
}

/// Trains with the recipe above, `overrides` applied as --set does.
pub(super) fn run(
    dir: &Path,
    overrides: &[&str],
    force: bool,
) -> anyhow::Result<feinschliff::train::TrainSummary> {
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    let recipe = feinschliff::recipe::Recipe::load(&write_recipe(dir), &overrides)?;
    let options = feinschliff::train::RunOptions {
        force,
        resume: false,
    };
    feinschliff::train::run(&recipe, &recipe.locate_base()?, options)
}

#[test]
fn loss_falls_and_metrics_are_logged() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let summary = run(dir.path(), &[], false).unwrap();
    let out = dir.path().join("out");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.resolved.toml",
        "metrics.jsonl",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 25);
    for key in [
        "step",
        "epoch",
        "loss",
        "lr",
        "grad_norm",
        "tokens",
        "tokens_per_s",
    ] {
        assert!(lines[0].get(key).is_some(), "metrics line lacks {key}");
    }
    assert_eq!(
        lines[0]["lr"], 0.0,
        "warm-up starts at 0 as transformers does"
    );
    assert!(lines[9].get("val_loss").is_some() && lines[24].get("val_loss").is_some());
    let mean = |s: &[serde_json::Value]| {
        s.iter().map(|l| l["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64
    };
    let (first, last) = (mean(&lines[..5]), mean(&lines[20..]));
    assert!(last < 0.8 * first, "loss did not fall: {first} -> {last}");
    assert!(summary.val_loss.unwrap() < lines[9]["val_loss"].as_f64().unwrap() + 0.5);

    // The chart plots exactly metrics.jsonl's points.
    let svg = std::fs::read_to_string(out.join("loss.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
    assert!(svg.contains("validation loss") && svg.contains("learning rate"));
    // loss.png: the same chart at the SVG's size, drawn (not blank), kept for a person to look at.
    let (width, height, inked) = png_pixels(&out.join("loss.png"));
    assert_eq!((width, height), (980, 1000));
    assert!(inked > 20_000, "loss.png looks blank: {inked} pixels drawn");
    keep_artifact(&out.join("loss.png"), "loss.png");
    let plotted: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("loss.json")).unwrap()).unwrap();
    let points =
        |key: &str| -> Vec<(f64, f64)> { serde_json::from_value(plotted[key].clone()).unwrap() };
    let from_metrics = |key: &str| -> Vec<(f64, f64)> {
        lines
            .iter()
            .filter_map(|l| Some((l["step"].as_f64()?, l[key].as_f64()?)))
            .collect()
    };
    for key in ["loss", "val_loss", "lr"] {
        assert_eq!(points(key), from_metrics(key), "{key}");
    }
    assert_eq!(points("loss_smoothed").len(), 25);
    assert_eq!(
        points("loss_smoothed")[0],
        points("loss")[0],
        "debiased smoothing starts at the first loss"
    );
}

#[test]
fn same_seed_gives_byte_identical_adapters() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    for d in [&a, &b] {
        write_dataset(d.path());
        run(d.path(), &["train.max_steps=6"], false)
            .map(|_| ())
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
    let read = |d: &tempfile::TempDir| {
        std::fs::read(d.path().join("out/adapter_model.safetensors")).unwrap()
    };
    assert_eq!(read(&a), read(&b));
    let other = tempfile::tempdir().unwrap();
    write_dataset(other.path());
    run(other.path(), &["train.max_steps=6", "train.seed=4"], false)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_ne!(
        read(&a),
        read(&other),
        "a different seed should give a different adapter"
    );
}

#[test]
fn existing_output_is_not_overwritten_without_force() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let err = format!(
        "{:#}",
        run(dir.path(), &["train.max_steps=2"], false).unwrap_err()
    );
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    run(dir.path(), &["train.max_steps=2"], true).unwrap();
    assert!(!out.join("keep.txt").exists() && out.join("adapter_model.safetensors").exists());
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "staging folders left behind");
}

#[test]
fn bad_data_is_reported_with_file_and_column() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("train.jsonl"),
        "{\"promt\": \"a\", \"completion\": \"b\"}\n",
    )
    .unwrap();
    let err = format!("{:#}", run(dir.path(), &[], false).unwrap_err());
    assert!(
        err.contains("train.jsonl")
            && err.contains("no column `prompt`")
            && err.contains("did you mean `promt`"),
        "{err}"
    );
    assert!(!dir.path().join("out").exists());
}

#[test]
fn training_continues_an_existing_peft_adapter() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    run(
        dir.path(),
        &["train.max_steps=3", "output.dir=first"],
        false,
    )
    .unwrap();
    let first = dir.path().join("first");
    run(
        dir.path(),
        &[
            "train.max_steps=3",
            "output.dir=second",
            &format!("lora.init_from={}", first.display()),
        ],
        false,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let read = |d: &str| {
        candle_core::safetensors::load(
            dir.path().join(d).join("adapter_model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (a, b) = (read("first"), read("second"));
    assert_eq!(a.len(), b.len());
    let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight";
    let moved = super::common::max_abs_diff(&a[key], &b[key]);
    assert!(moved > 0.0, "continued training did not change the adapter");
    let err = format!(
        "{:#}",
        run(dir.path(), &["lora.init_from=nowhere"], false).unwrap_err()
    );
    assert!(
        err.contains("[lora] init_from") && err.contains("adapter_config.json"),
        "{err}"
    );
}

#[test]
fn bf16_training_follows_the_f32_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let curve = |dtype: &str, out: &str| -> Vec<f64> {
        run(
            dir.path(),
            &[
                "train.max_steps=12",
                "lora.dropout=0.0",
                &format!("model.dtype={dtype}"),
                &format!("output.dir={out}"),
            ],
            false,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        std::fs::read_to_string(dir.path().join(out).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let f32_curve = curve("f32", "f32");
    let bf16_curve = curve("bf16", "bf16");
    // bf16 rounds weights and activations to 8 bits of mantissa: the curves agree to a few percent.
    for (step, (a, b)) in f32_curve.iter().zip(&bf16_curve).enumerate() {
        assert!(
            (a - b).abs() <= 0.05 * a,
            "step {}: f32 {a} vs bf16 {b}",
            step + 1
        );
    }
    assert!(bf16_curve.last() < bf16_curve.first());
}

/// With early stopping, a run whose validation loss stops improving ends before max_steps, and
/// load_best_at_end leaves the adapter of the best evaluation, not the last one.
#[test]
fn early_stopping_keeps_the_best_adapter() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    // A learning rate far too high: the validation loss soon rises.
    let settings = [
        "train.lr=0.3",
        "train.warmup_steps=0",
        "train.max_steps=40",
        "train.eval_every=1",
        "train.early_stopping_patience=3",
        "train.load_best_at_end=true",
    ];
    let summary = run(dir.path(), &settings, false).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(
        summary.steps < 40,
        "stopped early ({} steps)",
        summary.steps
    );
    let text = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let val: Vec<f64> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["val_loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(val.len(), summary.steps);
    let best = val.iter().cloned().fold(f64::INFINITY, f64::min);
    let best_at = val.iter().position(|v| *v == best).unwrap();
    assert_eq!(
        val.len() - 1 - best_at,
        3,
        "patience 3 after the best: {val:?}"
    );

    let overrides: Vec<String> = settings.iter().map(|s| s.to_string()).collect();
    let recipe =
        feinschliff::recipe::Recipe::load(&dir.path().join("recipe.toml"), &overrides).unwrap();
    let mut model =
        feinschliff::model::Model::load(tiny_llama_dir(), None, &candle_core::Device::Cpu).unwrap();
    model.load_adapter(&dir.path().join("out")).unwrap();
    let data = feinschliff::data::prepare(&recipe, &model.tokenizer).unwrap();
    let pad = model.tokenizer.pad_id();
    let kept = feinschliff::train::validation_loss(&model, &data.validation, 4, pad).unwrap();
    assert!(
        (kept - best).abs() < 1e-6,
        "the kept adapter's validation loss {kept} is the best {best}, not the last {}",
        val.last().unwrap()
    );
}
