//! Special tokens as transformers 5 and lm-evaluation-harness 0.4.13 add them, against the goldens
//! of tests/fixtures/lm_eval_bos (made by make_lm_eval_bos_fixtures.py): tokenizer(text), decoding
//! with special tokens skipped, training samples, lm-eval's requests, and `model inspect`.

use candle_core::Device;
use feinschliff::data::encode::Encoder;
use feinschliff::data::format::Sample;
use feinschliff::data::template::Message;
use feinschliff::data::IGNORE_INDEX;
use feinschliff::eval::scorer::Scorer;
use feinschliff::model::{inspect, Model, ModelTokenizer};
use serde_json::Value;

use super::common::{bos_fixture_model, json_ids, repo, trained_ids};

const VARIANTS: [&str; 4] = ["llama3_style", "llama2_style", "flag_only", "bos_eos"];
const LM_EVAL_VARIANTS: [&str; 2] = ["llama3_style", "llama2_style"];

fn read(path: &str) -> Value {
    let path = repo().join("tests/fixtures/lm_eval_bos").join(path);
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn tokenizer(variant: &str) -> ModelTokenizer {
    ModelTokenizer::from_dir(&repo().join("tests/fixtures/lm_eval_bos").join(variant)).unwrap()
}

/// transformers' ids of `text` with special tokens, from tokenization.json.
fn transformers_ids(golden: &Value, text: &str) -> Vec<u32> {
    let entry = golden["texts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["text"] == text)
        .unwrap();
    json_ids(&entry["ids"])
}

#[test]
fn tokenizer_adds_and_skips_what_transformers_does() {
    let golden = read("tokenization.json");
    for variant in VARIANTS {
        let (tok, g) = (tokenizer(variant), &golden[variant]);
        for t in g["texts"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            let with = tok.encode_with_special_tokens(text).unwrap();
            assert_eq!(with, json_ids(&t["ids"]), "{variant}: tokenizer({text:?})");
            assert_eq!(
                tok.encode(text).unwrap(),
                json_ids(&t["plain"]),
                "{variant}"
            );
        }
        let d = &g["decode"];
        assert_eq!(
            tok.decode(&json_ids(&d["ids"])).unwrap(),
            d["text"],
            "{variant}"
        );
        assert_eq!(
            tok.decode_skipping_special(&json_ids(&d["ids"])).unwrap(),
            d["skip_special_tokens"],
            "{variant}"
        );
    }
}

#[test]
fn training_samples_are_tokenized_as_transformers_does() {
    let golden = read("tokenization.json");
    for variant in VARIANTS {
        let (tok, g) = (tokenizer(variant), &golden[variant]);
        let eos = tok.eos_id().unwrap();
        let encoder = Encoder::new(&tok, "model", false).unwrap();
        let prefix = tok.specials.prefix.len();
        // Text and completion: tokenizer(text), then EOS once.
        let (prompt, completion) = ("Frage: Wo wohnt Anna?\nAntwort:", " In Hamburg.");
        let whole = format!("{prompt}{completion}");
        let mut want = transformers_ids(g, &whole);
        if want.last() != Some(&eos) {
            want.push(eos);
        }
        let text = encoder.encode(&Sample::Text(whole.clone())).unwrap();
        assert_eq!(text.example.input_ids, want, "{variant}: text");
        assert!(text.example.labels[..prefix]
            .iter()
            .all(|&l| l == IGNORE_INDEX));
        assert!(text.example.labels[prefix..].iter().all(|&l| l >= 0));
        let sample = Sample::Completion {
            prompt: prompt.into(),
            completion: completion.into(),
        };
        let e = encoder.encode(&sample).unwrap().example;
        assert_eq!(e.input_ids, want, "{variant}: completion");
        let trained = trained_ids(&e);
        let completion_ids = &want[want.len() - trained.len()..];
        assert_eq!(
            trained, completion_ids,
            "{variant}: only the completion trains"
        );
        assert_eq!(
            tok.decode_skipping_special(completion_ids).unwrap(),
            completion,
            "{variant}"
        );
        // Chat: the rendered template without added special tokens (one BOS where it writes one).
        let chat = &g["chat"];
        let messages: Vec<Message> = chat["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| Message {
                role: m["role"].as_str().unwrap().into(),
                content: m["content"].as_str().unwrap().into(),
            })
            .collect();
        let e = encoder.encode(&Sample::Chat(messages)).unwrap();
        assert_eq!(e.text, chat["text"], "{variant}: rendered chat");
        assert_eq!(
            e.example.input_ids,
            json_ids(&chat["ids"]),
            "{variant}: apply_chat_template"
        );
    }
}

#[test]
fn lm_eval_requests_are_built_as_hflm_builds_them() {
    for variant in LM_EVAL_VARIANTS {
        let dir = bos_fixture_model(variant);
        let model = Model::load(dir.path(), None, &Device::Cpu).unwrap();
        let scorer = Scorer::new(&model, Some(64), 8);
        let g = &read(&format!("{variant}/golden.json"))["tokenization"];
        assert_eq!(scorer.prefix_token() as u64, g["prefix_token_id"]);
        for t in g["tok_encode"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            assert_eq!(
                scorer.tok_encode(text).unwrap(),
                json_ids(&t["ids"]),
                "{text:?}"
            );
        }
        for p in g["pairs"].as_array().unwrap() {
            let (c, x) = (p["context"].as_str().unwrap(), p["continuation"].as_str());
            let r = scorer.encode_pair(c, x.unwrap()).unwrap();
            assert_eq!(
                r.context,
                json_ids(&p["context_ids"]),
                "{variant}: {c:?} {x:?}"
            );
            assert_eq!(
                r.continuation,
                json_ids(&p["continuation_ids"]),
                "{c:?} {x:?}"
            );
        }
        for p in g["generation_prompts"].as_array().unwrap() {
            let text = p["text"].as_str().unwrap();
            let prompt = scorer.generation_prompt(text, 48).unwrap();
            assert_eq!(prompt, json_ids(&p["ids"]), "{variant}: {text:?}");
        }
    }
}

#[test]
fn model_inspect_says_whether_bos_is_added() {
    let golden = read("tokenization.json");
    let cases = [
        ("llama3_style", "BOS added: <|endoftext|> (0) before each text, by tokenizer.json's post-processor (Sequence[ByteLevel, TemplateProcessing])"),
        ("llama2_style", "BOS added: <|endoftext|> (0) before each text, by tokenizer.json's post-processor (TemplateProcessing)"),
        ("flag_only", "no BOS/EOS added to text, by tokenizer.json's post-processor (ByteLevel); chat templates are encoded as rendered; tokenizer_config.json's add_bos_token: true is ignored"),
        ("bos_eos", "BOS added: <|endoftext|> (0) before and <|im_end|> (2) after each text"),
    ];
    for (variant, want) in cases {
        let dir = bos_fixture_model(variant);
        let model = Model::load(dir.path(), None, &Device::Cpu).unwrap();
        let summary = inspect::summary(&model).unwrap();
        assert!(summary.contains(want), "{variant}: {summary}");
        // --text is tokenized as tokenizer(text).
        let (_, input_ids) = inspect::logits_of(&model, "Hallo Welt").unwrap();
        let got: Vec<u32> = input_ids
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        assert_eq!(got, transformers_ids(&golden[variant], "Hallo Welt"));
    }
}
