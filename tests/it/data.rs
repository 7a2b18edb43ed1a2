//! The data pipeline: every source type, format and template path, mask spans, packing, hygiene
//! and bad data.

use candle_core::Device;
use feinschliff::data::{
    self, template::ChatTemplate, template::Message, Batch, Example, Prepared,
};
use feinschliff::model::{Model, ModelTokenizer};
use feinschliff::recipe::Recipe;
use polars::prelude::*;
use std::path::Path;

use super::common::{tiny_llama_dir, trained_ids};

pub(super) fn tokenizer() -> ModelTokenizer {
    ModelTokenizer::from_dir(tiny_llama_dir()).unwrap()
}

/// A recipe in `dir` whose [data] section is `data` (plus `[[data.train]]` tables inside it).
fn recipe(dir: &Path, data: &str) -> Recipe {
    // No validation split unless the test asks for one.
    let fraction = if data.contains("validation_fraction") {
        ""
    } else {
        "validation_fraction = 0.0\n"
    };
    let text = format!(
        "[model]\nbase = \"{}\"\n\n[data]\n{fraction}{data}\n\n[output]\ndir = \"out\"\n",
        tiny_llama_dir().display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, text).unwrap();
    Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e:#}"))
}

pub(super) fn prepare(dir: &Path, data: &str) -> anyhow::Result<Prepared> {
    data::prepare(&recipe(dir, data), &tokenizer())
}

fn msg(role: &str, content: &str) -> Message {
    Message {
        role: role.into(),
        content: content.into(),
    }
}

/// The text of the tokens that carry a label.
fn trained_text(tok: &ModelTokenizer, e: &Example) -> String {
    tok.decode(&trained_ids(e)).unwrap()
}

#[test]
fn every_file_type_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(
        d.join("a.jsonl"),
        "{\"text\": \"Erster Satz.\"}\n{\"text\": \"Zweiter Satz.\"}\n",
    )
    .unwrap();
    std::fs::write(d.join("b.ndjson"), "{\"text\": \"Dritter Satz.\"}\n").unwrap();
    std::fs::write(
        d.join("c.json"),
        "[{\"text\": \"Vierter Satz.\"}, {\"text\": \"Fünfter Satz.\"}]",
    )
    .unwrap();
    std::fs::write(d.join("d.csv"), "id,text\n1,\"Sechster, mit Komma.\"\n").unwrap();
    std::fs::write(d.join("e.tsv"), "id\ttext\n1\tSiebter Satz.\n").unwrap();
    std::fs::write(d.join("f.txt"), "id;text\n1;'Achter; mit Semikolon.'\n").unwrap();
    let mut df = df!("text" => ["Neunter Satz.", "Zehnter Satz."]).unwrap();
    ParquetWriter::new(std::fs::File::create(d.join("g.parquet")).unwrap())
        .finish(&mut df)
        .unwrap();
    std::fs::create_dir(d.join("glob")).unwrap();
    for i in 0..3 {
        std::fs::write(
            d.join(format!("glob/part-{i}.jsonl")),
            format!("{{\"text\": \"Teil {i}.\"}}\n"),
        )
        .unwrap();
    }
    // .txt is not a known type: it must be named as unsupported.
    let err = format!(
        "{:#}",
        prepare(d, "format = \"text\"\n[[data.train]]\npath = \"f.txt\"")
            .err()
            .unwrap()
    );
    assert!(
        err.contains("f.txt") && err.contains("unsupported file type"),
        "{err}"
    );
    std::fs::rename(d.join("f.txt"), d.join("f.csv")).unwrap();
    let p = prepare(
        d,
        r#"format = "text"
dedup = false
[[data.train]]
path = "a.jsonl"
[[data.train]]
path = "b.ndjson"
[[data.train]]
path = "c.json"
[[data.train]]
path = "d.csv"
[[data.train]]
path = "e.tsv"
[[data.train]]
path = "f.csv"
delimiter = ";"
quote = "'"
[[data.train]]
path = "g.parquet"
[[data.train]]
path = "glob/*.jsonl""#,
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    let rows: Vec<usize> = p.report.train_sources.iter().map(|s| s.rows_read).collect();
    assert_eq!(rows, vec![2, 1, 2, 1, 1, 1, 2, 3]);
    assert_eq!(p.report.train_sources[7].files, Some(3));
    assert_eq!(p.train.len(), 13);
    let tok = tokenizer();
    let all: Vec<String> = p
        .train
        .iter()
        .map(|e| tok.decode(&e.input_ids).unwrap())
        .collect();
    assert!(all.iter().any(|t| t.contains("Sechster, mit Komma.")));
    assert!(all.iter().any(|t| t.contains("Achter; mit Semikolon.")));
}

#[test]
fn completion_format_trains_on_the_completion_only() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.jsonl"),
        "{\"frage\": \"Wie hoch ist der Abschlag?\", \"antwort\": \" 42 Euro im Monat.\"}\n",
    )
    .unwrap();
    let p = prepare(dir.path(), "format = \"completion\"\ncolumns.prompt = \"frage\"\ncolumns.completion = \"antwort\"\n[[data.train]]\npath = \"t.jsonl\"").unwrap();
    let tok = tokenizer();
    assert_eq!(
        trained_text(&tok, &p.train[0]),
        " 42 Euro im Monat.<|im_end|>"
    );
    assert_eq!(p.train[0].labels[0], data::IGNORE_INDEX);
}

#[test]
fn instruction_format_renders_with_the_model_template() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("t.jsonl"),
        "{\"instruction\": \"Berechne die Kosten.\", \"input\": \"1000 kWh\", \"output\": \"350 Euro.\", \"system\": \"Sei knapp.\"}\n",
    )
    .unwrap();
    let p = prepare(
        dir.path(),
        "format = \"instruction\"\n[[data.train]]\npath = \"t.jsonl\"",
    )
    .unwrap();
    let e = &p.preview[0];
    assert_eq!(
        e.text,
        "<|im_start|>system\nSei knapp.<|im_end|>\n<|im_start|>user\nBerechne die Kosten.\n\n1000 kWh<|im_end|>\n<|im_start|>assistant\n350 Euro.<|im_end|>\n"
    );
    assert_eq!(
        trained_text(&tokenizer(), &p.train[0]),
        "350 Euro.<|im_end|>"
    );
}

#[test]
fn multi_turn_chat_trains_on_every_assistant_turn_only() {
    let dir = tempfile::tempdir().unwrap();
    let chat = serde_json::json!({"messages": [
        {"role": "system", "content": "Du bist der Kundenservice."},
        {"role": "user", "content": "Hallo!"},
        {"role": "assistant", "content": "Guten Tag, wie kann ich helfen?"},
        {"role": "user", "content": "Wann ist offen?"},
        {"role": "assistant", "content": "Montag bis Freitag, 8 bis 18 Uhr."}
    ]});
    std::fs::write(dir.path().join("c.jsonl"), format!("{chat}\n")).unwrap();
    let p = prepare(
        dir.path(),
        "format = \"chat\"\n[[data.train]]\npath = \"c.jsonl\"",
    )
    .unwrap();
    let e = &p.preview[0];
    let spans: Vec<&str> = e.trained.iter().map(|r| &e.text[r.clone()]).collect();
    assert_eq!(
        spans,
        vec![
            "Guten Tag, wie kann ich helfen?<|im_end|>",
            "Montag bis Freitag, 8 bis 18 Uhr.<|im_end|>"
        ]
    );
    let tok = tokenizer();
    assert_eq!(
        trained_text(&tok, &p.train[0]),
        "Guten Tag, wie kann ich helfen?<|im_end|>Montag bis Freitag, 8 bis 18 Uhr.<|im_end|>"
    );
    let all = prepare(
        dir.path(),
        "format = \"chat\"\ntrain_on_inputs = true\n[[data.train]]\npath = \"c.jsonl\"",
    )
    .unwrap();
    assert_eq!(
        all.train[0].target_count(),
        all.train[0].input_ids.len() - 1
    );
}

#[test]
fn sharegpt_columns_and_roles_are_mapped() {
    let dir = tempfile::tempdir().unwrap();
    let row = serde_json::json!({"conversations": [{"from": "human", "value": "Frage?"}, {"from": "gpt", "value": "Antwort."}]});
    std::fs::write(dir.path().join("s.jsonl"), format!("{row}\n")).unwrap();
    let cfg = "format = \"chat\"\ncolumns.messages = \"conversations\"\ncolumns.role = \"from\"\ncolumns.content = \"value\"\nroles.human = \"user\"\nroles.gpt = \"assistant\"\n[[data.train]]\npath = \"s.jsonl\"";
    let p = prepare(dir.path(), cfg).unwrap();
    assert_eq!(
        p.preview[0].text,
        "<|im_start|>user\nFrage?<|im_end|>\n<|im_start|>assistant\nAntwort.<|im_end|>\n"
    );
    // Without the role mapping, `human` is an unknown role: an error with file and row.
    let err = format!(
        "{:#}",
        prepare(dir.path(), &cfg.replace("roles.human = \"user\"\n", ""))
            .err()
            .unwrap()
    );
    assert!(
        err.contains("s.jsonl row 1") && err.contains("unknown role `human`"),
        "{err}"
    );
    // Without the field mapping, the message fields are named with the fix.
    let err = format!("{:#}", prepare(dir.path(), "format = \"chat\"\ncolumns.messages = \"conversations\"\n[[data.train]]\npath = \"s.jsonl\"").err().unwrap());
    assert!(
        err.contains("from, value") && err.contains("role = \"from\""),
        "{err}"
    );
}

#[test]
fn builtin_templates_render_as_their_models_do() {
    let conv = vec![
        msg("system", "S"),
        msg("user", "Hallo"),
        msg("assistant", "Hi"),
    ];
    let llama3 =
        ChatTemplate::builtin("llama3", Some("<|begin_of_text|>"), Some("<|eot_id|>")).unwrap();
    assert_eq!(
        llama3.render(&conv, false).unwrap(),
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHallo<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHi<|eot_id|>"
    );
    let mistral = ChatTemplate::builtin("mistral", Some("<s>"), Some("</s>")).unwrap();
    assert_eq!(
        mistral.render(&conv, false).unwrap(),
        "<s>[INST] S\n\nHallo [/INST] Hi</s>"
    );
    let spans = mistral.render_with_spans(&conv).unwrap();
    assert_eq!(&spans.text[spans.trained[0].clone()], " Hi</s>");
    let bad = vec![msg("user", "a"), msg("user", "b")];
    let err = format!("{:#}", mistral.render(&bad, false).unwrap_err());
    assert!(
        err.contains("alternate"),
        "raise_exception must surface: {err}"
    );
    let alpaca = ChatTemplate::builtin("alpaca", None, Some("</s>")).unwrap();
    let text = alpaca.render(&conv[1..], true).unwrap();
    assert!(
        text.starts_with("Below is an instruction")
            && text.contains("### Instruction:\nHallo\n\n### Response:\nHi</s>"),
        "{text}"
    );
    let chatml = ChatTemplate::builtin("chatml", None, None).unwrap();
    assert_eq!(
        chatml.render(&conv[1..2], true).unwrap(),
        "<|im_start|>user\nHallo<|im_end|>\n<|im_start|>assistant\n"
    );
    assert!(ChatTemplate::builtin("vicuna", None, None).is_err());
}

#[test]
fn hf_template_features_work() {
    // tojson, loop controls, namespace, python string methods, strftime_now, trim/lstrip blocks.
    let source = r#"{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' %}{% continue %}{% endif -%}
  {%- set ns.n = ns.n + 1 -%}
  {{ m.role.upper() }}:{{ m.content.strip() }}|{{ m | tojson }}
{% endfor -%}
{{ ns.n }}{% if strftime_now('%Y') | length == 4 %}Y{% endif %}"#;
    let t = ChatTemplate::new(source, None, None).unwrap();
    let out = t
        .render(&[msg("system", "x"), msg("user", " a ")], false)
        .unwrap();
    // Python's json.dumps spacing, as transformers' tojson renders it.
    assert_eq!(out, "USER:a|{\"role\": \"user\", \"content\": \" a \"}\n1Y");
}

#[test]
fn packed_loss_equals_unpacked_loss() {
    let model = Model::load(tiny_llama_dir(), None, &Device::Cpu).unwrap();
    let mut lm = model.lm;
    let cfg = super::common::all_linear_lora(4, 8.0, 0.0);
    feinschliff::model::adapter::attach(&mut lm, &cfg, 1).unwrap();
    for (_, v) in feinschliff::model::adapter::trainable(&lm) {
        v.set(&(v.as_tensor().ones_like().unwrap() * 0.05).unwrap())
            .unwrap();
    }
    let examples: Vec<Example> = (0..5)
        .map(|k| {
            let ids: Vec<u32> = (0..7 + 3 * k)
                .map(|i| (i * 31 + k * 7) as u32 % 1000 + 3)
                .collect();
            let labels = ids
                .iter()
                .enumerate()
                .map(|(i, &t)| if i < 2 { data::IGNORE_INDEX } else { t as i64 })
                .collect();
            Example::single(ids, labels)
        })
        .collect();
    let nll = |rows: &[Example]| -> (f64, usize) {
        let refs: Vec<&Example> = rows.iter().collect();
        let batch = Batch::pad(&refs, 0, &Device::Cpu).unwrap();
        let (s, n) = feinschliff::train::loss::summed_nll(&lm, &batch, None).unwrap();
        (s.to_scalar::<f32>().unwrap() as f64, n)
    };
    let (unpacked, n1) = nll(&examples);
    let packed_rows = data::pack::pack(examples.clone(), 40);
    assert!(packed_rows.len() < examples.len(), "nothing was packed");
    assert!(packed_rows.iter().any(|r| r.segments.len() > 1));
    let (packed, n2) = nll(&packed_rows);
    assert_eq!(n1, n2);
    assert!(
        (unpacked / n1 as f64 - packed / n2 as f64).abs() < 1e-5,
        "{unpacked} vs {packed}"
    );
}

#[test]
fn hygiene_dedup_weights_limits_and_splits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut lines = String::new();
    for i in 0..20 {
        lines.push_str(&format!("{{\"text\": \"Satz Nummer {i}.\"}}\n"));
    }
    lines.push_str("{\"text\": \"Satz Nummer 3.\"}\n{\"text\": \"\"}\n{\"text\": null}\n");
    std::fs::write(d.join("a.jsonl"), &lines).unwrap();
    std::fs::write(d.join("val.jsonl"), "{\"text\": \"Validierung.\"}\n").unwrap();
    let base = "format = \"text\"\n[[data.train]]\npath = \"a.jsonl\"";
    let p = prepare(d, base).unwrap();
    assert_eq!(p.report.duplicates_dropped, 1);
    assert_eq!(p.report.train_sources[0].dropped["empty `text`"], 2);
    assert_eq!(p.train.len(), 20);
    let p = prepare(d, &format!("{base}\nweight = 2.0")).unwrap();
    assert_eq!(p.train.len(), 40);
    let p = prepare(d, &format!("{base}\nweight = 0.5")).unwrap();
    assert!(p.train.len() > 3 && p.train.len() < 17, "{}", p.train.len());
    let p = prepare(
        d,
        &base.replace(
            "format = \"text\"",
            "format = \"text\"\nmax_samples = 5\nvalidation_fraction = 0.2",
        ),
    )
    .unwrap();
    assert_eq!((p.train.len(), p.validation.len()), (5, 4));
    let p = prepare(
        d,
        &format!("{base}\n[[data.validation]]\npath = \"val.jsonl\""),
    )
    .unwrap();
    assert_eq!((p.train.len(), p.validation.len()), (20, 1));
    let p = prepare(
        d,
        &base.replace("format = \"text\"", "format = \"text\"\nmax_seq_len = 4"),
    )
    .unwrap();
    assert_eq!(p.report.truncated, 20);
    assert!(p.train.iter().all(|e| e.input_ids.len() == 4));
    let plain = prepare(d, base).unwrap();
    let shortest = *plain.report.lengths.iter().min().unwrap();
    let longest = *plain.report.lengths.iter().max().unwrap();
    assert!(
        shortest < longest,
        "the test needs samples of different lengths"
    );
    let filtered = base.replace(
        "format = \"text\"",
        &format!("format = \"text\"\nmax_tokens = {shortest}\nmin_tokens = 2"),
    );
    let f = prepare(d, &filtered).unwrap();
    assert!(f.report.too_long > 0 && f.report.too_long + f.train.len() == 20);
    let f = prepare(
        d,
        &base.replace(
            "format = \"text\"",
            &format!("format = \"text\"\nmin_tokens = {longest}"),
        ),
    )
    .unwrap();
    assert!(f.report.too_short > 0 && f.report.too_short + f.train.len() == 20);
    // Packing reports its efficiency.
    let p = prepare(
        d,
        &base.replace(
            "format = \"text\"",
            "format = \"text\"\npacking = true\nmax_seq_len = 64",
        ),
    )
    .unwrap();
    assert!(p.report.packing_efficiency.unwrap() > 0.5 && p.train.len() < 20);
    // Seeded shuffle: same seed, same order.
    let a = prepare(d, base).unwrap();
    let b = prepare(d, base).unwrap();
    assert_eq!(a.train, b.train);
}

#[test]
fn bad_data_gives_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let case = |file: &str, content: &[u8], data: &str| -> String {
        std::fs::write(d.join(file), content).unwrap();
        format!(
            "{:#}",
            prepare(d, &format!("{data}\n[[data.train]]\npath = \"{file}\""))
                .err()
                .expect("should fail")
        )
    };
    let e = case("a.jsonl", b"{\"txt\": \"x\"}\n", "format = \"text\"");
    assert!(
        e.contains("a.jsonl") && e.contains("no column `text`") && e.contains("did you mean `txt`"),
        "{e}"
    );
    let e = case("b.jsonl", b"{\"text\": 5}\n", "format = \"text\"");
    assert!(
        e.contains("b.jsonl") && e.contains("must hold text") && e.contains("i64"),
        "{e}"
    );
    let e = case(
        "c.jsonl",
        b"{\"text\": \"\"}\n{\"text\": null}\n",
        "format = \"text\"",
    );
    assert!(
        e.contains("no training samples are left") && e.contains("2 rows read"),
        "{e}"
    );
    let e = case("d.csv", b"text\n\"ung\xfcltig\"\n", "format = \"text\"");
    assert!(e.contains("d.csv") && e.contains("UTF-8"), "{e}");
    let e = case(
        "e.jsonl",
        b"{\"messages\": [{\"role\": \"bot\", \"content\": \"x\"}]}\n",
        "format = \"chat\"",
    );
    assert!(
        e.contains("e.jsonl row 1")
            && e.contains("unknown role `bot`")
            && e.contains("[data.roles]"),
        "{e}"
    );
    let e = case("f.jsonl", b"{\"text\": \"a\"\n", "format = \"text\"");
    assert!(e.contains("f.jsonl") && e.contains("line 1:"), "{e}");
    let e = case(
        "g.jsonl",
        b"{\"messages\": \"not json\"}\n",
        "format = \"chat\"",
    );
    assert!(e.contains("g.jsonl row 1"), "{e}");
    // Lossy decoding is opt-in for csv.
    std::fs::write(d.join("h.csv"), b"text\n\"ung\xfcltig\"\n").unwrap();
    let p = prepare(
        d,
        "format = \"text\"\n[[data.train]]\npath = \"h.csv\"\nencoding = \"utf8-lossy\"",
    )
    .unwrap();
    assert_eq!(p.train.len(), 1);
}

#[test]
fn unreadable_data_files_name_the_line() {
    use feinschliff::data::source::{read_file, ReadOptions};
    let dir = tempfile::tempdir().unwrap();
    let error = |file: &str, content: &str| -> String {
        let path = dir.path().join(file);
        std::fs::write(&path, content).unwrap();
        let e = format!(
            "{:#}",
            read_file(&path, &ReadOptions::default()).unwrap_err()
        );
        assert!(e.contains(file), "{e}");
        e
    };
    // polars says "Syntax at character 27" or "TapeError at character 0"; the message names the
    // line, counted from 1, blank lines included.
    let rows = "{\"text\": \"a\"}\n\n{\"text\": \"b\"}\n";
    let e = error("a.jsonl", &format!("{rows}{{\"text\": \"c\", }}\n{rows}"));
    assert!(e.contains("line 4: not valid JSON at column"), "{e}");
    let e = error("b.jsonl", &format!("{rows}[\"c\"]\n"));
    assert!(e.contains("line 4: not a JSON object"), "{e}");
    let e = error("c.jsonl", "{\"text\": \"a\u{1}\"}\n");
    assert!(e.contains("line 1: not valid JSON at column 12"), "{e}");
    let e = error("d.jsonl", "{\"n\": [1]}\n{\"n\": [2]}\n{\"n\": [true]}\n");
    assert!(
        e.contains("line 3: `n[]` is true/false here, but a number on line 1"),
        "{e}"
    );
    let e = error("h.jsonl", "{\"m\": [{\"role\": \"a\", \"role\": \"b\"}]}\n");
    assert!(
        e.contains("line 1: the key `role` appears twice in one object (column 27)"),
        "{e}"
    );
    let e = error("e.jsonl", "\n\n");
    assert!(e.contains("holds no rows"), "{e}");
    let e = error("f.csv", "text,id\n\"a\",1\n\"b\",2,3\n");
    assert!(
        e.contains("line 3: 3 fields, but the first line has 2"),
        "{e}"
    );
    let e = error("g.csv", "text,id\n\"a\",1\n\"b,2\nc,3\n");
    assert!(
        e.contains("line 3: a quoted field opens here and never closes"),
        "{e}"
    );
}

#[test]
fn hub_datasets_resolve_through_the_mirror() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let split = d.join("mirror/acme/support/default/train");
    std::fs::create_dir_all(&split).unwrap();
    std::fs::write(
        split.join("0000.jsonl"),
        "{\"text\": \"Aus dem Spiegel.\"}\n",
    )
    .unwrap();
    std::fs::create_dir_all(d.join("mirror/acme/other")).unwrap();
    std::fs::write(
        d.join("mirror/acme/other/test.jsonl"),
        "{\"text\": \"Testsplit.\"}\n",
    )
    .unwrap();
    let p = prepare(d, "format = \"text\"\nmirror = \"mirror\"\n[[data.train]]\nhub = \"acme/support\"\nsplit = \"train\"\n[[data.train]]\nhub = \"acme/other\"\nsplit = \"test\"").unwrap();
    assert_eq!(p.train.len(), 2);
    let err = format!("{:#}", prepare(d, "format = \"text\"\nmirror = \"mirror\"\n[[data.train]]\nhub = \"acme/support\"\nsplit = \"validation\"").err().unwrap());
    assert!(err.contains("no files for split `validation`"), "{err}");
    let err = format!(
        "{:#}",
        prepare(d, "format = \"text\"\n[[data.train]]\nhub = \"not a repo\"")
            .err()
            .unwrap()
    );
    assert!(err.contains("not a Hub repo id"), "{err}");
}

#[test]
fn shipped_recipes_prepare() {
    for entry in std::fs::read_dir(super::common::repo().join("recipes")).unwrap() {
        let path = entry.unwrap().path();
        let mut r =
            Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        r.model.base = tiny_llama_dir().display().to_string();
        let p =
            data::prepare(&r, &tokenizer()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert!(p.train.len() > 10, "{}", path.display());
        assert!(p.train.iter().all(|e| e.target_count() > 0));
    }
}

/// Excel's CSV export on German Windows (Windows-1252, `;`, CRLF) and a UTF-16 TSV with a
/// byte-order mark: the umlauts, ß and € arrive byte for byte as UTF-8.
#[test]
fn legacy_encodings_are_decoded_before_reading() {
    use feinschliff::data::source::{read_file, ReadOptions};
    let dir = tempfile::tempdir().unwrap();
    let rows = [
        (
            "Wie hoch ist die Grundgebühr?",
            "Sie beträgt 12,50 € im Monat.",
        ),
        ("Wo ist das Büro?", "An der Großen Straße 3."),
    ];
    let mut csv = String::from("frage;antwort\r\n");
    for (q, a) in rows {
        csv.push_str(&format!("{q};{a}\r\n"));
    }
    let cp1252 = dir.path().join("faq.csv");
    std::fs::write(&cp1252, encoding_rs::WINDOWS_1252.encode(&csv).0).unwrap();
    let mut tsv = vec![0xFF, 0xFE];
    let text = csv.replace(';', "\t");
    tsv.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
    let utf16 = dir.path().join("faq.tsv");
    std::fs::write(&utf16, tsv).unwrap();

    let read = |path: &std::path::Path, encoding: &str, delimiter: &str| {
        let options = ReadOptions {
            encoding: Some(encoding.into()),
            delimiter: Some(delimiter.into()),
            ..Default::default()
        };
        let df = read_file(path, &options).unwrap_or_else(|e| panic!("{e:#}"));
        let column = |name: &str| -> Vec<String> {
            df.column(name)
                .unwrap()
                .str()
                .unwrap()
                .iter()
                .map(|v| v.unwrap().to_string())
                .collect()
        };
        (column("frage"), column("antwort"))
    };
    let want: (Vec<String>, Vec<String>) = (
        rows.iter().map(|r| r.0.to_string()).collect(),
        rows.iter().map(|r| r.1.to_string()).collect(),
    );
    assert_eq!(read(&cp1252, "windows-1252", ";"), want);
    assert_eq!(read(&cp1252, "auto", ";"), want);
    assert_eq!(read(&utf16, "utf-16", "\\t"), want);
    assert_eq!(read(&utf16, "auto", "\\t"), want);

    let strict = read_file(
        &cp1252,
        &ReadOptions {
            delimiter: Some(";".into()),
            ..Default::default()
        },
    )
    .unwrap_err();
    let err = format!("{strict:#}");
    assert!(
        err.contains("faq.csv") && err.contains("line 2") && err.contains("windows-1252"),
        "{err}"
    );
}
