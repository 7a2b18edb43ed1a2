//! `feinschliff chat`: greedy answers equal transformers' `generate` (tests/fixtures/chat, made by
//! make_chat_fixture.py), seeded sampling repeats, every EOS id ends an answer, piped turns end
//! cleanly at end of input, and `--compare` answers with base and adapted model.

use candle_core::{Device, Tensor};
use feinschliff::chat::{self, sampling::SamplingOptions, ChatOptions};
use feinschliff::data::template::{ChatTemplate, Message};
use feinschliff::model::{BaseModel, Model};
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::common::{all_linear_lora, repo};

fn model_dir() -> PathBuf {
    repo().join("tests/fixtures/lm_eval/model")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(repo().join("tests/fixtures/chat/golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn options(model: &Path) -> ChatOptions {
    ChatOptions {
        model: model.to_string_lossy().into_owned(),
        adapter: None,
        system: None,
        prompt: None,
        compare: false,
        sampling: SamplingOptions {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        },
        max_new_tokens: 20,
        device: "cpu".into(),
    }
}

fn chat_output(opts: &ChatOptions, input: &str) -> String {
    let mut out = Vec::new();
    chat::run(opts, &mut input.as_bytes(), &mut out).unwrap_or_else(|e| panic!("{e:#}"));
    String::from_utf8(out).unwrap()
}

#[test]
fn greedy_answers_equal_transformers_generate() {
    let model = Model::load(&model_dir(), None, &Device::Cpu).unwrap();
    let t = &model.tokenizer;
    let template = ChatTemplate::new(
        t.chat_template.as_deref().unwrap(),
        t.bos_token.as_deref(),
        t.eos_token.as_deref(),
    )
    .unwrap();
    for case in golden()["cases"].as_array().unwrap() {
        let system = case["system"].as_str().map(str::to_string);
        let user = case["user"].as_str().unwrap().to_string();
        let mut messages: Vec<Message> = system
            .iter()
            .map(|s| Message {
                role: "system".into(),
                content: s.clone(),
            })
            .collect();
        messages.push(Message {
            role: "user".into(),
            content: user.clone(),
        });
        let ids = t
            .encode(&template.render(&messages, true).unwrap())
            .unwrap();
        let want_ids: Vec<u32> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        assert_eq!(ids, want_ids, "prompt of {user:?}");

        let mut opts = options(&model_dir());
        opts.system = system;
        opts.prompt = Some(user.clone());
        let out = chat_output(&opts, "");
        assert_eq!(
            out,
            format!("{}\n", case["text"].as_str().unwrap()),
            "{user:?}"
        );
    }
}

#[test]
fn seeded_sampling_repeats_and_another_seed_differs() {
    let mut opts = options(&model_dir());
    opts.sampling.temperature = 1.0;
    opts.sampling.top_p = 0.95;
    opts.sampling.seed = 7;
    let turns = "Hallo\nWie geht es?\n";
    let first = chat_output(&opts, turns);
    assert_eq!(first, chat_output(&opts, turns));
    assert_eq!(first.lines().count(), 2, "{first:?}");
    opts.sampling.seed = 8;
    assert_ne!(first, chat_output(&opts, turns));
}

/// A model whose generation_config lists a second EOS id: the answer ends before that token.
#[test]
fn every_eos_id_ends_the_answer() {
    let case = &golden()["cases"][0];
    let new_ids: Vec<u32> = serde_json::from_value(case["new_ids"].clone()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir()).unwrap().flatten() {
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let generation = serde_json::json!({"eos_token_id": [2, new_ids[4]], "do_sample": false});
    std::fs::write(
        dir.path().join("generation_config.json"),
        generation.to_string(),
    )
    .unwrap();
    let mut opts = options(dir.path());
    opts.prompt = Some(case["user"].as_str().unwrap().into());
    let model = Model::load(dir.path(), None, &Device::Cpu).unwrap();
    let want = model
        .tokenizer
        .decode_skipping_special(&new_ids[..4])
        .unwrap();
    assert_eq!(chat_output(&opts, ""), format!("{want}\n"));
}

/// The binary with piped turns: each gets an answer from base and adapted model, and end of
/// input (Ctrl-D) ends the session with exit code 0.
#[test]
fn piped_turns_compare_base_and_adapter_until_end_of_input() {
    let dir = tempfile::tempdir().unwrap();
    let mut model = Model::load(&model_dir(), None, &Device::Cpu).unwrap();
    model.attach_lora(&all_linear_lora(4, 8.0, 0.0), 1).unwrap();
    for (name, var) in model.trainable() {
        if name.contains("lora_B") {
            var.set(
                &(Tensor::ones(var.shape(), var.dtype(), &Device::Cpu).unwrap() * 0.5).unwrap(),
            )
            .unwrap();
        }
    }
    let base = BaseModel {
        dir: model_dir(),
        hub_id: None,
        revision: None,
    };
    let adapter_dir = dir.path().join("adapter");
    std::fs::create_dir(&adapter_dir).unwrap();
    model.save_adapter(&base, &adapter_dir).unwrap();

    let mut child = Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["chat", "--model"])
        .arg(model_dir())
        .arg("--adapter")
        .arg(&adapter_dir)
        .args(["--compare", "--max-new-tokens", "6", "--device", "cpu"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all("Hallo\n\nWo ist das Kundenzentrum?\n".as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let labels: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split(']').next())
        .filter(|l| l.starts_with('['))
        .collect();
    assert_eq!(labels, ["[base", "[adapted", "[base", "[adapted"], "{text}");
    let answers: Vec<&str> = text.lines().filter(|l| l.starts_with('[')).collect();
    assert_ne!(
        answers[0].trim_start_matches("[base] "),
        answers[1].trim_start_matches("[adapted] "),
        "the adapter changes the answer: {text}"
    );
}
