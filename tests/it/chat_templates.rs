//! The chat templates of Gemma 2, Gemma 3, Phi-3, Qwen3 and Mistral-Nemo as the models ship them
//! (tests/fixtures/chat_templates): rendered as transformers renders them, trained on exactly each
//! answer and its end-of-turn token, refused with the file and row where the template raises; and
//! Mistral-Nemo's Tekken tokenizer, whose ids (texts and chats) equal transformers'.

use feinschliff::data::{self, inspect, template::ChatTemplate, template::Message};
use feinschliff::model::ModelTokenizer;
use feinschliff::recipe::Recipe;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tokenizers::{AddedToken, Tokenizer};

use super::common::{assert_tokenizes_as, json_ids, repo, tiny_llama_dir, trained_ids};

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/chat_templates").join(name)
}

fn read_json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

fn template_source(family: &str) -> String {
    std::fs::read_to_string(fixture(&format!("{family}.jinja"))).unwrap()
}

fn messages(v: &Value) -> Vec<Message> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|m| Message {
            role: m["role"].as_str().unwrap().into(),
            content: m["content"].as_str().unwrap().into(),
        })
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// A copy of the tiny llama whose tokenizer has `family`'s tokens, BOS/EOS and chat template; for
/// a family with its own tokenizer folder (Mistral-Nemo), that folder's tokenizer files.
fn family_model(family: &str) -> tempfile::TempDir {
    let spec = &read_json("families.json")[family];
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(tiny_llama_dir()).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    if let Some(folder) = spec["tokenizer"].as_str() {
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(fixture(folder).join(f), dir.path().join(f)).unwrap();
        }
        return dir;
    }
    let rstrip = strings(&spec["rstrip_tokens"]);
    let path = dir.path().join("tokenizer.json");
    let mut tokenizer = Tokenizer::from_file(&path).unwrap();
    let specials = strings(&spec["special_tokens"])
        .into_iter()
        .map(|t| AddedToken::from(t.clone(), true).rstrip(rstrip.contains(&t)));
    tokenizer.add_special_tokens(specials).unwrap();
    let added = strings(&spec["added_tokens"])
        .into_iter()
        .map(|t| AddedToken::from(t, false));
    tokenizer.add_tokens(added).unwrap();
    tokenizer.save(&path, false).unwrap();
    let config = json!({
        "bos_token": spec["bos_token"],
        "eos_token": spec["eos_token"],
        "chat_template": template_source(family),
    });
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    dir
}

/// A recipe in `dir` training on the chat file `data` with the model at `base`.
fn chat_recipe(dir: &Path, base: &Path, rows: &[Value]) -> Recipe {
    let lines: String = rows
        .iter()
        .map(|m| format!("{}\n", json!({ "messages": m })))
        .collect();
    std::fs::write(dir.join("chats.jsonl"), lines).unwrap();
    let text = format!(
        "[model]\nbase = \"{}\"\n\n[data]\nformat = \"chat\"\nvalidation_fraction = 0.0\n[[data.train]]\npath = \"chats.jsonl\"\n\n[output]\ndir = \"out\"\n",
        base.display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

#[test]
fn family_templates_render_as_transformers_does() {
    let golden = read_json("golden.json");
    let families = read_json("families.json");
    let cases = golden["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 25);
    for case in cases {
        let family = case["family"].as_str().unwrap();
        let label = format!("{family} {}", case["conversation"]);
        let spec = &families[family];
        let template = ChatTemplate::new(
            &template_source(family),
            spec["bos_token"].as_str(),
            spec["eos_token"].as_str(),
        )
        .unwrap();
        let all = messages(&case["messages"]);
        let check = |got: anyhow::Result<String>, want: &Value, what: &str| match want.get("text") {
            Some(text) => assert_eq!(got.unwrap(), text.as_str().unwrap(), "{label}: {what}"),
            None => {
                let err = format!("{:#}", got.unwrap_err());
                let raised = want["error"].as_str().unwrap();
                assert!(err.contains(raised), "{label}: {what}: {err}");
            }
        };
        check(template.render(&all, false), case, "conversation");
        let assistant_turns = all
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant");
        for ((i, _), want) in assistant_turns.zip(case["prompts"].as_array().unwrap()) {
            check(template.render(&all[..i], true), want, "generation prompt");
        }
    }
}

#[test]
fn family_templates_train_exactly_the_answers_and_their_end_of_turn_tokens() {
    let golden = read_json("golden.json");
    let conversation = |name: &str| -> Value {
        golden["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["conversation"] == name)
            .unwrap()["messages"]
            .clone()
    };
    // Per family: (conversation, the trained text of each assistant turn).
    type Turns<'a> = &'a [&'a str];
    let expected: [(&str, &[(&str, Turns)]); 4] = [
        (
            "gemma2",
            &[
                (
                    "multi_turn",
                    &[
                        "Guten Tag, wie kann ich helfen?<end_of_turn>",
                        "12,50 Euro im Monat.<end_of_turn>",
                    ],
                ),
                ("whitespace", &["Antwort mit Leerraum<end_of_turn>"]),
            ],
        ),
        (
            "gemma3",
            &[
                (
                    "multi_turn",
                    &[
                        "Guten Tag, wie kann ich helfen?<end_of_turn>",
                        "12,50 Euro im Monat.<end_of_turn>",
                    ],
                ),
                // The system message is folded into the first user turn, which does not train.
                (
                    "system",
                    &["Über das Formular im Kundenportal.<end_of_turn>"],
                ),
            ],
        ),
        (
            "phi3",
            &[
                // The closing <|endoftext|> after the last turn does not train.
                (
                    "multi_turn",
                    &[
                        "Guten Tag, wie kann ich helfen?<|end|>",
                        "12,50 Euro im Monat.<|end|>",
                    ],
                ),
                ("system", &["Über das Formular im Kundenportal.<|end|>"]),
            ],
        ),
        (
            "qwen3",
            &[
                // The last turn trains the empty reasoning block the template writes into it.
                (
                    "multi_turn",
                    &[
                        "Guten Tag, wie kann ich helfen?<|im_end|>",
                        "<think>\n\n</think>\n\n12,50 Euro im Monat.<|im_end|>",
                    ],
                ),
                // Earlier reasoning is dropped by the template; the last turn's is trained.
                (
                    "reasoning",
                    &[
                        "12<|im_end|>",
                        "<think>\nFünf mal sechs ist dreißig.\n</think>\n\n30<|im_end|>",
                    ],
                ),
            ],
        ),
    ];
    for (family, cases) in expected {
        let model = family_model(family);
        let tokenizer = ModelTokenizer::from_dir(model.path()).unwrap();
        for (name, turns) in cases {
            let work = tempfile::tempdir().unwrap();
            let recipe = chat_recipe(work.path(), model.path(), &[conversation(name)]);
            let prepared = data::prepare(&recipe, &tokenizer).unwrap_or_else(|e| panic!("{e:#}"));
            let e = &prepared.preview[0];
            let spans: Vec<&str> = e.trained.iter().map(|r| &e.text[r.clone()]).collect();
            assert_eq!(&spans, turns, "{family} {name}: trained spans");
            // The labels: exactly the tokens of those spans, end-of-turn tokens included.
            let trained = tokenizer.decode(&trained_ids(&prepared.train[0])).unwrap();
            assert_eq!(trained, turns.concat(), "{family} {name}: trained tokens");
            let end = e.text.rfind(turns[turns.len() - 1]).unwrap() + turns[turns.len() - 1].len();
            let untrained_tail = &e.text[end..];
            assert!(
                ["\n", "\n<|endoftext|>"].contains(&untrained_tail),
                "{family} {name}: after the last turn: {untrained_tail:?}"
            );
        }
    }
}

/// The Tekken-style tokenizer in Mistral-Nemo's layout (1000 special tokens first, the bytes at
/// 1000 + byte value, Tekken's split, `<s>` added before a text): German texts with umlauts and ß,
/// digits, CamelCase, a URL, control-token strings inside text, as transformers tokenizes them.
#[test]
fn mistral_nemo_tekken_tokenizer_equals_transformers() {
    let t = ModelTokenizer::from_dir(&fixture("mistral_nemo")).unwrap();
    let golden = read_json("mistral_nemo/tokenization.json");
    assert_tokenizes_as(&t, &golden["mistral_nemo"], "mistral_nemo");
    assert_eq!(t.vocab_size(), 2048);
    assert_eq!(t.special_tokens().len(), 1000);
    for (token, id) in [
        ("<s>", 1),
        ("[INST]", 3),
        ("[/INST]", 4),
        ("<SPECIAL_999>", 999),
    ] {
        assert_eq!(t.inner.token_to_id(token), Some(id), "{token}");
    }
    assert_eq!(
        (&t.specials.prefix[..], &t.specials.suffix[..]),
        (&[1][..], &[][..])
    );
}

/// Every Mistral-Nemo conversation of golden.json through the data pipeline: the ids are those of
/// transformers' `apply_chat_template(tokenize=True)` (also each generation prompt's), and exactly
/// each answer and its `</s>` train — also where the template drops the system message (Nemo's
/// puts it before the last user turn only, so a conversation ending with an answer loses it).
#[test]
fn mistral_nemo_chats_have_transformers_ids_and_train_each_answer_with_its_eos() {
    let model = family_model("mistral_nemo");
    let tokenizer = ModelTokenizer::from_dir(model.path()).unwrap();
    let template = ChatTemplate::new(
        tokenizer.chat_template.as_deref().unwrap(),
        Some("<s>"),
        Some("</s>"),
    )
    .unwrap();
    let golden = read_json("golden.json");
    let cases = golden["cases"].as_array().unwrap().iter();
    for case in cases.filter(|c| c["family"] == "mistral_nemo") {
        let name = case["conversation"].as_str().unwrap();
        let all = messages(&case["messages"]);
        let work = tempfile::tempdir().unwrap();
        let recipe = chat_recipe(work.path(), model.path(), &[case["messages"].clone()]);
        let prepared = data::prepare(&recipe, &tokenizer).unwrap_or_else(|e| panic!("{e:#}"));
        let e = &prepared.train[0];
        assert_eq!(e.input_ids, json_ids(&case["ids"]), "{name}");
        let answers: Vec<(usize, &Message)> = all
            .iter()
            .enumerate()
            .filter(|(_, m)| m.role == "assistant")
            .collect();
        for ((i, _), prompt) in answers.iter().zip(case["prompts"].as_array().unwrap()) {
            let text = template.render(&all[..*i], true).unwrap();
            assert_eq!(
                tokenizer.encode(&text).unwrap(),
                json_ids(&prompt["ids"]),
                "{name}"
            );
        }
        // The trained tokens, run by run: one run per answer, each its content and </s>.
        let mut runs: Vec<Vec<u32>> = Vec::new();
        for (k, (&id, &label)) in e.input_ids.iter().zip(&e.labels).enumerate() {
            match (label >= 0, k > 0 && e.labels[k - 1] >= 0) {
                (true, true) => runs.last_mut().unwrap().push(id),
                (true, false) => runs.push(vec![id]),
                _ => {}
            }
        }
        let trained: Vec<String> = runs.iter().map(|r| tokenizer.decode(r).unwrap()).collect();
        let want: Vec<String> = answers
            .iter()
            .map(|(_, m)| format!("{}</s>", m.content))
            .collect();
        assert_eq!(trained, want, "{name}: trained runs");
        assert_eq!(e.input_ids.last(), Some(&2), "{name}: ends with </s>");
    }
}

#[test]
fn a_template_that_raises_names_the_data_file_and_row() {
    let model = family_model("gemma2");
    let work = tempfile::tempdir().unwrap();
    let ok = json!([{"role": "user", "content": "Hallo!"}, {"role": "assistant", "content": "Guten Tag."}]);
    let system = json!([
        {"role": "system", "content": "Du bist der Kundenservice."},
        {"role": "user", "content": "Hallo!"},
        {"role": "assistant", "content": "Guten Tag."}
    ]);
    let recipe = chat_recipe(work.path(), model.path(), &[ok.clone(), ok, system]);
    let tokenizer = ModelTokenizer::from_dir(model.path()).unwrap();
    let err = format!("{:#}", data::prepare(&recipe, &tokenizer).err().unwrap());
    let data_file = work.path().join("chats.jsonl");
    assert!(
        err.contains(&format!("{} row 3", data_file.display()))
            && err.contains("tokenizer_config.json")
            && err.contains("System role not supported"),
        "{err}"
    );
}

#[test]
fn data_inspect_marks_the_trained_part_of_family_templates() {
    let model = family_model("phi3");
    let work = tempfile::tempdir().unwrap();
    let chat = json!([
        {"role": "system", "content": "Sei knapp."},
        {"role": "user", "content": "Wann ist offen?"},
        {"role": "assistant", "content": "Werktags von 8 bis 18 Uhr."}
    ]);
    let recipe = chat_recipe(work.path(), model.path(), &[chat]);
    let shown = inspect::run(&recipe, 1).unwrap();
    assert!(
        shown.contains("<|system|>\nSei knapp.<|end|>\n<|user|>\nWann ist offen?<|end|>\n<|assistant|>\n[[Werktags von 8 bis 18 Uhr.<|end|>]]\n<|endoftext|>"),
        "{shown}"
    );
}
