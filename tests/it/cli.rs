//! The binary: exit codes, messages, `model new` and `model inspect`.

use std::process::Command;

use super::common::tiny_llama_dir;

fn feinschliff(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn bad_recipe_exits_non_zero_with_message() {
    let (_dir, path) = super::common::write_temp("r.toml", "[model]\nbase = 3\n");
    let out = feinschliff(&["train", path.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("r.toml") && err.contains("line 2"), "{err}");
}

#[test]
fn model_new_is_deterministic_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    for d in [&a, &b] {
        let out = feinschliff(&[
            "model",
            "new",
            "--arch",
            "qwen2",
            "--size",
            "tiny",
            "--seed",
            "9",
            "--out",
            d.to_str().unwrap(),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
    let before = std::fs::read(a.join("model.safetensors")).unwrap();
    let out = feinschliff(&[
        "model",
        "new",
        "--arch",
        "qwen2",
        "--seed",
        "1",
        "--out",
        a.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    assert_eq!(std::fs::read(a.join("model.safetensors")).unwrap(), before);
}

#[test]
fn inspect_reports_shapes_and_writes_logits() {
    let dir = tempfile::tempdir().unwrap();
    let logits = dir.path().join("logits.safetensors");
    let out = feinschliff(&[
        "model",
        "inspect",
        tiny_llama_dir().to_str().unwrap(),
        "--text",
        "Guten Tag, mein Zählerstand ist 12345.",
        "--logits-out",
        logits.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("family       llama") && text.contains("parameters"),
        "{text}"
    );
    let t = candle_core::safetensors::load(&logits, &candle_core::Device::Cpu).unwrap();
    let (seq, vocab) = t["logits"].dims2().unwrap();
    assert_eq!(t["input_ids"].dims(), &[seq]);
    assert_eq!(vocab, 1024);
}

#[test]
fn unknown_model_type_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"model_type": "gpt2"}"#).unwrap();
    let out = feinschliff(&["model", "inspect", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("config.json")
            && err.contains("gpt2")
            && err.contains("gemma2, gemma3, gemma3_text, llama, mistral, phi3, qwen2, qwen3"),
        "{err}"
    );
}

#[test]
fn missing_tensor_names_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(tiny_llama_dir().join(f), dir.path().join(f)).unwrap();
    }
    let mut tensors = candle_core::safetensors::load(
        tiny_llama_dir().join("model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    tensors.remove("model.layers.1.mlp.down_proj.weight");
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let out = feinschliff(&["model", "inspect", dir.path().to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("model.safetensors") && err.contains("model.layers.1.mlp.down_proj.weight"),
        "{err}"
    );
}

#[test]
fn train_names_device_memory_and_peak_and_refuses_an_absent_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = |device: &str, out: &str| {
        format!(
            "[model]\nbase = \"{}\"\n[data]\nformat = \"instruction\"\nmax_seq_len = 64\n[[data.train]]\npath = \"{}\"\n[train]\nmax_steps = 2\nbatch_size = 2\ndevice = \"{device}\"\n[output]\ndir = \"{out}\"\n",
            tiny_llama_dir().display(),
            super::common::repo()
                .join("datasets/support-faq/faq.parquet")
                .display()
        )
    };
    let path = dir.path().join("r.toml");

    std::fs::write(&path, recipe("cuda:0", "gpu-out")).unwrap();
    let out = feinschliff(&["train", path.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    if cfg!(not(feature = "cuda")) {
        assert!(!out.status.success());
        assert!(
            err.contains("cuda:0") && err.contains("--features cuda"),
            "{err}"
        );
        assert!(
            !dir.path().join("gpu-out").exists(),
            "a failed run left output"
        );
    }

    std::fs::write(&path, recipe("cpu", "cpu-out")).unwrap();
    let out = feinschliff(&["train", path.to_str().unwrap()]);
    let (log, stdout) = (
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout),
    );
    assert!(out.status.success(), "{log}");
    assert!(
        log.contains("on cpu (") && log.contains(" GB free RAM; ") && log.contains("bf16 weights"),
        "{log}"
    );
    assert!(log.contains("frozen base in F32"), "{log}");
    assert!(stdout.contains("peak RSS"), "{stdout}");
}
