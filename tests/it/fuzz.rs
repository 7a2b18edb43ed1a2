//! Fuzzed inputs: every file Feinschliff reads (recipes, suites, dataset rows, config.json,
//! tokenizer files, chat templates, adapter configs, safetensors headers), as random bytes and as
//! structured mutations of valid files (a value replaced by a random one, a key deleted, the file
//! cut at a byte, bytes inserted). A loader accepts its input or fails with an error that names
//! the file and, where there is one, the line or key; it never panics.
//!
//! The seed is fixed so that runs repeat; `PROPTEST_RNG_SEED=<n>` explores others and
//! `PROPTEST_CASES=<n>` runs more cases.

use candle_core::Device;
use feinschliff::data::encode::Encoder;
use feinschliff::data::format::{Drops, RowMapping, Sample};
use feinschliff::data::source::{read_file, ReadOptions};
use feinschliff::data::template::Message;
use feinschliff::eval::suite::Suite;
use feinschliff::model::{
    BaseModel, LoraConfig, Model, ModelConfig, ModelTokenizer, TargetModules,
};
use feinschliff::recipe::{Columns, DataFormat, Recipe};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, RngSeed};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use super::common::{repo, tiny_llama_dir};

/// `cases` cases (unless PROPTEST_CASES says otherwise), a fixed seed (unless PROPTEST_RNG_SEED
/// says otherwise), and no regression files: what a failure finds becomes a named test.
fn settings(cases: u32) -> Config {
    let mut config = Config::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        config.cases = cases;
    }
    if std::env::var_os("PROPTEST_RNG_SEED").is_none() {
        config.rng_seed = RngSeed::Fixed(14);
    }
    config.failure_persistence = None;
    config
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// One change to a valid file.
#[derive(Debug, Clone)]
enum Edit<V> {
    /// The node at one of the document's paths (a key, an array element, a line) is replaced
    /// (`Some`) or deleted (`None`).
    Node(Index, Option<V>),
    /// The file is cut at a byte.
    Truncate(Index),
    /// Bytes are inserted at a byte.
    Insert(Index, Vec<u8>),
    /// Bytes are overwritten from a byte on.
    Overwrite(Index, Vec<u8>),
    /// The file is these bytes.
    Bytes(Vec<u8>),
}

/// Random bytes: arbitrary ones, or printable text heavy in the syntax of JSON and TOML.
fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..48),
        "[ -~\n\t]{0,32}".prop_map(String::into_bytes),
        "[\\[\\]{}\"'=:,.#\n0-9a-z ]{0,24}".prop_map(String::into_bytes),
    ]
}

/// Edits with node values from `value`, mostly structured ones.
fn edit<V: std::fmt::Debug + Clone>(
    value: impl Strategy<Value = V>,
) -> impl Strategy<Value = Edit<V>> {
    prop_oneof![
        5 => (any::<Index>(), value).prop_map(|(i, v)| Edit::Node(i, Some(v))),
        2 => any::<Index>().prop_map(|i| Edit::Node(i, None)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => (any::<Index>(), bytes()).prop_map(|(i, b)| Edit::Insert(i, b)),
        1 => (any::<Index>(), bytes()).prop_map(|(i, b)| Edit::Overwrite(i, b)),
        1 => bytes().prop_map(Edit::Bytes),
    ]
}

/// Text: short, with Unicode, quotes, braces and control characters.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_ ]{0,10}",
        "\\PC{0,12}",
        ".{0,8}",
        Just(String::new()),
    ]
}

/// A random JSON value: scalars of every kind (edge numbers included), small arrays and objects.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        (-2i64..70).prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A random TOML value: every type (NaN and infinities included), small arrays and tables.
fn toml_value() -> impl Strategy<Value = toml::Value> {
    let leaf = prop_oneof![
        any::<bool>().prop_map(toml::Value::Boolean),
        (-2i64..70).prop_map(toml::Value::Integer),
        any::<i64>().prop_map(toml::Value::Integer),
        any::<f64>().prop_map(toml::Value::Float),
        Just(toml::Value::Float(f64::NAN)),
        text().prop_map(toml::Value::String),
        Just(toml::Value::Datetime(
            "1979-05-27T07:32:00Z".parse().expect("a TOML datetime")
        )),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(toml::Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| toml::Value::Table(m.into_iter().collect())),
        ]
    })
}

/// A step into a document: an object key or an array index.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    At(usize),
}

/// A document tree that paths can walk and edits can change.
trait Tree: Sized {
    fn children(&self) -> Vec<(Step, &Self)>;
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self>;
    fn put(&mut self, step: &Step, value: Option<Self>);
}

impl Tree for Value {
    fn children(&self) -> Vec<(Step, &Self)> {
        match self {
            Value::Object(m) => m.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Step::At(i), v))
                .collect(),
            _ => Vec::new(),
        }
    }
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self> {
        match (self, step) {
            (Value::Object(m), Step::Key(k)) => m.get_mut(k),
            (Value::Array(a), Step::At(i)) => a.get_mut(*i),
            _ => None,
        }
    }
    fn put(&mut self, step: &Step, value: Option<Self>) {
        match (self, step, value) {
            (Value::Object(m), Step::Key(k), Some(v)) => {
                m.insert(k.clone(), v);
            }
            (Value::Object(m), Step::Key(k), None) => {
                m.remove(k);
            }
            (Value::Array(a), Step::At(i), Some(v)) => a[*i] = v,
            (Value::Array(a), Step::At(i), None) => {
                a.remove(*i);
            }
            _ => {}
        }
    }
}

impl Tree for toml::Value {
    fn children(&self) -> Vec<(Step, &Self)> {
        match self {
            toml::Value::Table(m) => m.iter().map(|(k, v)| (Step::Key(k.clone()), v)).collect(),
            toml::Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| (Step::At(i), v))
                .collect(),
            _ => Vec::new(),
        }
    }
    fn child_mut(&mut self, step: &Step) -> Option<&mut Self> {
        match (self, step) {
            (toml::Value::Table(m), Step::Key(k)) => m.get_mut(k),
            (toml::Value::Array(a), Step::At(i)) => a.get_mut(*i),
            _ => None,
        }
    }
    fn put(&mut self, step: &Step, value: Option<Self>) {
        match (self, step, value) {
            (toml::Value::Table(m), Step::Key(k), Some(v)) => {
                m.insert(k.clone(), v);
            }
            (toml::Value::Table(m), Step::Key(k), None) => {
                m.remove(k);
            }
            (toml::Value::Array(a), Step::At(i), Some(v)) => a[*i] = v,
            (toml::Value::Array(a), Step::At(i), None) => {
                a.remove(*i);
            }
            _ => {}
        }
    }
}

/// The paths of a document's nodes below the root. Of a container with more than 64 children
/// only the first 4 are walked: vocabularies and merge lists would drown everything else.
fn paths<T: Tree>(root: &T) -> Vec<Vec<Step>> {
    fn walk<T: Tree>(node: &T, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
        let children = node.children();
        let n = if children.len() > 64 {
            4
        } else {
            children.len()
        };
        for (step, child) in children.into_iter().take(n) {
            prefix.push(step);
            out.push(prefix.clone());
            walk(child, prefix, out);
            prefix.pop();
        }
    }
    let mut out = Vec::new();
    walk(root, &mut Vec::new(), &mut out);
    out
}

/// A mutated file and the keys of a structured edit: the edited key, the tables holding it and
/// the keys inside a new value; no keys for byte-level edits.
#[derive(Debug)]
struct Mutated {
    bytes: Vec<u8>,
    keys: Vec<String>,
}

/// Applies a byte-level edit; None for a structured one.
fn byte_edit<V>(valid: &[u8], edit: &Edit<V>) -> Option<Vec<u8>> {
    let at = |i: &Index| i.index(valid.len() + 1);
    match edit {
        Edit::Node(..) => None,
        Edit::Truncate(i) => Some(valid[..at(i)].to_vec()),
        Edit::Insert(i, b) => {
            let mut out = valid.to_vec();
            out.splice(at(i)..at(i), b.iter().copied());
            Some(out)
        }
        Edit::Overwrite(i, b) => {
            let mut out = valid.to_vec();
            for (k, &byte) in b.iter().enumerate() {
                if let Some(slot) = out.get_mut(at(i) + k) {
                    *slot = byte;
                }
            }
            Some(out)
        }
        Edit::Bytes(b) => Some(b.clone()),
    }
}

/// Applies `edit` to the document `root` (parsed from `valid`), written back with `write`; None
/// when the edited document cannot be written in its format.
fn mutate<T: Tree + Clone>(
    valid: &[u8],
    root: &T,
    write: impl Fn(&T) -> Option<Vec<u8>>,
    edit: &Edit<T>,
) -> Option<Mutated> {
    if let Some(bytes) = byte_edit(valid, edit) {
        return Some(Mutated {
            bytes,
            keys: Vec::new(),
        });
    }
    let Edit::Node(i, value) = edit else {
        return None;
    };
    let all = paths(root);
    if all.is_empty() {
        return None;
    }
    let path = i.get(&all);
    let mut root = root.clone();
    let (last, parents) = path.split_last()?;
    let mut node = &mut root;
    for step in parents {
        node = node.child_mut(step)?;
    }
    node.put(last, value.clone());
    let inside = value.iter().flat_map(paths).flatten();
    let keys = path
        .iter()
        .cloned()
        .chain(inside)
        .filter_map(|s| match s {
            Step::Key(k) => Some(k),
            Step::At(_) => None,
        })
        .collect();
    Some(Mutated {
        bytes: write(&root)?,
        keys,
    })
}

fn mutate_json(valid: &[u8], edit: &Edit<Value>) -> Option<Mutated> {
    let root: Value = serde_json::from_slice(valid).expect("a valid JSON seed");
    mutate(valid, &root, |v| serde_json::to_vec_pretty(v).ok(), edit)
}

fn mutate_toml(valid: &str, edit: &Edit<toml::Value>) -> Option<Mutated> {
    let root = toml::Value::Table(valid.parse().expect("a valid TOML seed"));
    let write = |v: &toml::Value| toml::to_string(v).ok().map(String::into_bytes);
    mutate(valid.as_bytes(), &root, write, edit)
}

/// A text file with `edit` applied to its lines, if there is one.
fn edited_lines(valid: Vec<u8>, edit: &Option<Edit<Vec<u8>>>) -> Vec<u8> {
    match edit {
        Some(e) => mutate_lines(&valid, e).bytes,
        None => valid,
    }
}

/// Applies `edit` to the lines of a text file (a node is a line).
fn mutate_lines(valid: &[u8], edit: &Edit<Vec<u8>>) -> Mutated {
    if let Some(bytes) = byte_edit(valid, edit) {
        return Mutated {
            bytes,
            keys: Vec::new(),
        };
    }
    let mut lines: Vec<Vec<u8>> = valid.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    if let Edit::Node(i, line) = edit {
        let at = i.index(lines.len());
        match line {
            Some(l) => lines[at] = l.clone(),
            None => {
                lines.remove(at);
            }
        }
    }
    Mutated {
        bytes: lines.join(&b'\n'),
        keys: Vec::new(),
    }
}

fn parses_json(bytes: &[u8]) -> bool {
    serde_json::from_slice::<Value>(bytes).is_ok()
}

fn parses_toml(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| s.parse::<toml::Table>().is_ok())
}

/// Whether `word` occurs in `text` on its own (not inside a longer name).
fn names(text: &str, word: &str) -> bool {
    let is_name = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        !text[..at].chars().next_back().is_some_and(is_name)
            && !text[at + word.len()..].chars().next().is_some_and(is_name)
    })
}

/// An error must name `file`; a line when the file is not well-formed; one of the edited keys
/// (the key or a table holding it) when a key was edited.
fn check(
    err: &anyhow::Error,
    file: &str,
    m: &Mutated,
    well_formed: bool,
) -> Result<(), TestCaseError> {
    let msg = format!("{err:#}");
    prop_assert!(msg.contains(file), "the error does not name {file}: {msg}");
    // The TOML parser points at the line and column of what does not fit the schema (a value
    // of the wrong type in an inline array of tables has no key of its own).
    let located = msg.contains("TOML parse error at line");
    if !well_formed {
        prop_assert!(
            msg.contains("line"),
            "the error about malformed {file} names no line: {msg}"
        );
    } else if !m.keys.is_empty() && !located {
        prop_assert!(
            m.keys.iter().any(|k| names(&msg, k)),
            "the error names none of the edited keys {:?}: {msg}",
            m.keys
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Valid files to start from

/// The tiny llama checkpoint's files, and a LoRA adapter for it, in memory.
struct Seeds {
    config: Vec<u8>,
    tokenizer: Vec<u8>,
    tokenizer_config: Vec<u8>,
    weights: Vec<u8>,
    adapter_config: Vec<u8>,
    adapter_weights: Vec<u8>,
}

fn seeds() -> &'static Seeds {
    static SEEDS: OnceLock<Seeds> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let dir = tiny_llama_dir();
        let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
        // llama3 rope scaling gives config.json's nested fields something to break.
        let mut config: Value = serde_json::from_slice(&read("config.json")).unwrap();
        config["rope_scaling"] = serde_json::json!({
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 1024
        });
        let mut model = Model::load(dir, None, &Device::Cpu).unwrap();
        let lora = LoraConfig {
            r: 2,
            alpha: 4.0,
            dropout: 0.0,
            target_modules: TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]),
            use_rslora: false,
        };
        model.attach_lora(&lora, 1).unwrap();
        let out = tempfile::tempdir().unwrap();
        let base = BaseModel {
            dir: dir.to_path_buf(),
            hub_id: Some("acme/tiny-llama".into()),
            revision: None,
        };
        model.save_adapter(&base, out.path()).unwrap();
        Seeds {
            config: serde_json::to_vec_pretty(&config).unwrap(),
            tokenizer: read("tokenizer.json"),
            tokenizer_config: read("tokenizer_config.json"),
            weights: read("model.safetensors"),
            adapter_config: std::fs::read(out.path().join("adapter_config.json")).unwrap(),
            adapter_weights: std::fs::read(out.path().join("adapter_model.safetensors")).unwrap(),
        }
    })
}

/// A fresh folder holding `files`.
fn folder(files: &[(&str, &[u8])]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, bytes) in files {
        std::fs::write(dir.path().join(name), bytes).unwrap();
    }
    dir
}

/// The tiny checkpoint in a fresh folder, `replaced` files swapped in.
fn model_folder(replaced: &[(&str, &[u8])]) -> tempfile::TempDir {
    let s = seeds();
    let mut files: Vec<(&str, &[u8])> = vec![
        ("config.json", &s.config),
        ("tokenizer.json", &s.tokenizer),
        ("tokenizer_config.json", &s.tokenizer_config),
        ("model.safetensors", &s.weights),
    ];
    files.retain(|(n, _)| !replaced.iter().any(|(r, _)| r == n));
    files.extend_from_slice(replaced);
    folder(&files)
}

const RECIPE: &str = r#"
[model]
base = "model"
hub_id = "acme/tiny-llama"
dtype = "bf16"

[lora]
r = 4
alpha = 8
dropout = 0.1
target_modules = ["q_proj", "v_proj"]
use_rslora = true
init_from = "adapter"

[data]
format = "chat"
template = "chatml"
max_seq_len = 64
packing = true
validation_fraction = 0.2
max_samples = 100
min_tokens = 2
max_tokens = 60
columns = { role = "from", content = "value" }
roles = { human = "user", gpt = "assistant" }

[[data.train]]
path = "train.jsonl"
weight = 2.0
format = "chat"
license = "CC0-1.0"

[[data.train]]
path = "faq.csv"
format = "instruction"
delimiter = ";"
encoding = "utf8-lossy"
has_header = true

[[data.validation]]
hub = "acme/data"
config = "de"
split = "test"

[train]
epochs = 2
max_steps = 10
batch_size = 2
gradient_accumulation = 2
lr = 1e-3
lr_schedule = "linear"
warmup_steps = 1
weight_decay = 0.01
adam_beta1 = 0.9
adam_beta2 = 0.99
adam_eps = 1e-8
max_grad_norm = 1.0
seed = 7
eval_every = 5
device = "cpu"
save_every = 5
save_total_limit = 2
logging_steps = 1

[eval]
suites = ["suite.toml"]
limit = 4

[export]
out = "merged"
dtype = "f16"
max_shard_size = "2GB"

[publish]
repo = "acme/tiny-support"
private = true
allow_local_base = true

[output]
dir = "out"
license = "apache-2.0"
language = ["de"]
"#;

/// evals/german.toml: every task kind, filters, process_docs, gates.
const SUITE: &str = include_str!("../../evals/german.toml");

#[test]
fn the_valid_seeds_load() {
    let dir = folder(&[("recipe.toml", RECIPE.as_bytes()), ("suite.toml", b"")]);
    std::fs::create_dir(dir.path().join("adapter")).unwrap();
    std::fs::write(dir.path().join("adapter/adapter_config.json"), "{}").unwrap();
    Recipe::load(&dir.path().join("recipe.toml"), &[]).unwrap();
    let (_d, suite) = super::common::write_temp("suite.toml", SUITE);
    Suite::load(&suite).unwrap();
    let model = model_folder(&[]);
    ModelConfig::from_file(&model.path().join("config.json")).unwrap();
    let mut m = Model::load(model.path(), None, &Device::Cpu).unwrap();
    let adapter = folder(&[
        ("adapter_config.json", &seeds().adapter_config),
        ("adapter_model.safetensors", &seeds().adapter_weights),
    ]);
    m.load_adapter(adapter.path()).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Recipes and suites

proptest! {
    #![proptest_config(settings(1024))]

    #[test]
    fn recipes_load_or_name_file_line_and_key(edit in edit(toml_value())) {
        let Some(m) = mutate_toml(RECIPE, &edit) else { return Ok(()) };
        let dir = folder(&[("recipe.toml", &m.bytes), ("suite.toml", b"")]);
        std::fs::create_dir(dir.path().join("adapter")).unwrap();
        std::fs::write(dir.path().join("adapter/adapter_config.json"), "{}").unwrap();
        if let Err(e) = Recipe::load(&dir.path().join("recipe.toml"), &[]) {
            check(&e, "recipe.toml", &m, parses_toml(&m.bytes))?;
        }
    }

}

proptest! {
    #![proptest_config(settings(512))]

    #[test]
    fn suites_load_or_name_file_line_and_key(edit in edit(toml_value())) {
        let Some(m) = mutate_toml(SUITE, &edit) else { return Ok(()) };
        let dir = folder(&[("suite.toml", &m.bytes)]);
        if let Err(e) = Suite::load(&dir.path().join("suite.toml")) {
            check(&e, "suite.toml", &m, parses_toml(&m.bytes))?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dataset rows

/// A random row: the columns the formats read (and one they do not), with random values or
/// lists of messages.
fn row() -> impl Strategy<Value = Value> {
    let message = (
        prop::sample::select(vec!["system", "user", "assistant", "tool", "human", ""]),
        text(),
    )
        .prop_map(|(role, content)| serde_json::json!({"role": role, "content": content}));
    let field = prop_oneof![
        3 => prop::collection::vec(message, 0..4).prop_map(Value::Array),
        3 => text().prop_map(Value::from),
        2 => json_value(),
    ];
    let column = prop::sample::select(vec![
        "messages",
        "text",
        "prompt",
        "completion",
        "instruction",
        "input",
        "output",
        "system",
        "id",
    ]);
    prop::collection::btree_map(column, field, 0..5)
        .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()))
}

/// Rows as JSON lines.
fn as_json_lines(rows: &[Value]) -> Vec<u8> {
    rows.iter()
        .map(|r| serde_json::to_string(r).unwrap())
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// Rows as csv: the union of their columns, every field quoted, JSON for non-strings.
fn csv(rows: &[Value]) -> Vec<u8> {
    let columns: std::collections::BTreeSet<&String> = rows
        .iter()
        .filter_map(Value::as_object)
        .flat_map(|o| o.keys())
        .collect();
    let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let mut out: Vec<String> = vec![columns
        .iter()
        .map(|c| quote(c))
        .collect::<Vec<_>>()
        .join(",")];
    for r in rows {
        out.push(
            columns
                .iter()
                .map(|c| match r.get(c.as_str()) {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => quote(s),
                    Some(v) => quote(&v.to_string()),
                })
                .collect::<Vec<_>>()
                .join(","),
        );
    }
    out.join("\n").into_bytes()
}

/// The 1-based number of the first line of a JSON-lines file that is not a JSON object (blank
/// lines, of JSON's whitespace, are skipped).
fn first_bad_line(bytes: &[u8]) -> Option<usize> {
    bytes
        .split(|&b| b == b'\n')
        .position(|line| {
            !line.iter().all(|b| b" \t\r".contains(b))
                && !serde_json::from_slice::<Value>(line).is_ok_and(|v| v.is_object())
        })
        .map(|i| i + 1)
}

/// Reads `file` as the data stage does and maps its rows in every format, as eval reads them
/// too; errors must name the file, and for JSON lines the line. (For csv the line is named when
/// the fields of a record do not line up; polars' own messages name a column or byte offset.)
fn read_rows(dir: &Path, file: &str) -> Result<(), TestCaseError> {
    let path = dir.join(file);
    let frame = match read_file(&path, &ReadOptions::default()) {
        Ok(frame) => frame,
        Err(e) => {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains(file), "the error does not name {file}: {msg}");
            if file.ends_with(".jsonl") {
                match first_bad_line(&std::fs::read(&path).unwrap()) {
                    Some(line) => {
                        prop_assert!(msg.contains(&format!("line {line}:")), "line {line}: {msg}")
                    }
                    None => prop_assert!(msg.contains("line ") || msg.contains("no rows"), "{msg}"),
                }
            }
            return Ok(());
        }
    };
    let columns = Columns::default();
    let roles = BTreeMap::new();
    for format in [
        DataFormat::Chat,
        DataFormat::Text,
        DataFormat::Completion,
        DataFormat::Instruction,
    ] {
        let mapping = RowMapping {
            format,
            columns: &columns,
            roles: &roles,
        };
        if let Err(e) = mapping.samples(&frame, &path.display().to_string(), &mut Drops::new()) {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains(file), "the error does not name {file}: {msg}");
        }
    }
    let suite = dir.join("suite.toml");
    std::fs::write(
        &suite,
        format!("name = \"s\"\n[[task]]\nname = \"t\"\nkind = \"perplexity\"\ndataset = {{ path = \"{file}\" }}\nlicense = \"x\"\ncontext = \"x\"\n"),
    )
    .unwrap();
    let suite = Suite::load(&suite).unwrap();
    if let Err(e) = feinschliff::eval::tasks::load_docs(&suite, &suite.tasks[0].dataset) {
        let msg = format!("{e:#}");
        prop_assert!(msg.contains(file), "the error does not name {file}: {msg}");
    }
    Ok(())
}

/// A line of a data file: random bytes, or a random JSON value.
fn line() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        bytes(),
        json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

proptest! {
    #![proptest_config(settings(512))]

    #[test]
    fn json_lines_rows_read_or_name_file_and_line(
        rows in prop::collection::vec(row(), 0..6),
        edit in prop::option::of(edit(line())),
    ) {
        let bytes = edited_lines(as_json_lines(&rows), &edit);
        let dir = folder(&[("rows.jsonl", &bytes)]);
        read_rows(dir.path(), "rows.jsonl")?;
    }

    #[test]
    fn csv_rows_read_or_name_file(
        rows in prop::collection::vec(row(), 0..6),
        edit in prop::option::of(edit(line())),
    ) {
        let bytes = edited_lines(csv(&rows), &edit);
        let dir = folder(&[("rows.csv", &bytes)]);
        read_rows(dir.path(), "rows.csv")?;
    }
}

/// datasets/support-faq/faq.parquet.
fn faq_parquet() -> &'static [u8] {
    static FAQ: OnceLock<Vec<u8>> = OnceLock::new();
    FAQ.get_or_init(|| std::fs::read(repo().join("datasets/support-faq/faq.parquet")).unwrap())
}

/// Rows as parquet (through polars' JSON reader), when polars can type them.
fn parquet(rows: &[Value]) -> Option<Vec<u8>> {
    use polars::prelude::*;
    let mut df = JsonReader::new(std::io::Cursor::new(as_json_lines(rows)))
        .with_json_format(JsonFormat::JsonLines)
        .finish()
        .ok()?;
    let mut out = Vec::new();
    ParquetWriter::new(&mut out).finish(&mut df).ok()?;
    Some(out)
}

proptest! {
    #![proptest_config(settings(256))]

    #[test]
    fn parquet_rows_read_or_name_file(
        rows in prop::option::of(prop::collection::vec(row(), 1..6)),
        edit in prop::option::of(edit(Just(Vec::<u8>::new()))),
    ) {
        let valid = match &rows {
            Some(rows) => parquet(rows).unwrap_or_else(|| faq_parquet().to_vec()),
            None => faq_parquet().to_vec(),
        };
        let bytes = match &edit {
            Some(e) => byte_edit(&valid, e).unwrap_or(valid),
            None => valid,
        };
        let dir = folder(&[("rows.parquet", &bytes)]);
        read_rows(dir.path(), "rows.parquet")?;
    }
}

// ---------------------------------------------------------------------------------------------
// Model files

/// Whether every number in a JSON document is at most `max` in size (a model of that shape can
/// be built without exhausting memory).
fn small_numbers(v: &Value, max: f64) -> bool {
    match v {
        Value::Number(n) => n.as_f64().is_some_and(|f| f.abs() <= max),
        Value::Array(a) => a.iter().all(|x| small_numbers(x, max)),
        Value::Object(o) => o.values().all(|x| small_numbers(x, max)),
        _ => true,
    }
}

proptest! {
    #![proptest_config(settings(512))]

    #[test]
    fn model_configs_load_or_name_file_line_and_key(edit in edit(json_value())) {
        let Some(m) = mutate_json(&seeds().config, &edit) else { return Ok(()) };
        let dir = model_folder(&[("config.json", &m.bytes)]);
        match ModelConfig::from_file(&dir.path().join("config.json")) {
            Err(e) => check(&e, "config.json", &m, parses_json(&m.bytes))?,
            // A config of plausible sizes builds a model or fails naming a file.
            Ok(_) if small_numbers(&serde_json::from_slice(&m.bytes).unwrap(), 4096.0) => {
                if let Err(e) = Model::load(dir.path(), None, &Device::Cpu) {
                    let msg = format!("{e:#}");
                    prop_assert!(
                        msg.contains("config.json") || msg.contains("model.safetensors"),
                        "{msg}"
                    );
                }
            }
            Ok(_) => {}
        }
    }

}

proptest! {
    #![proptest_config(settings(256))]

    #[test]
    fn tokenizers_load_or_name_file_line_and_key(
        in_config in any::<bool>(),
        edit in edit(json_value()),
    ) {
        let s = seeds();
        let (file, valid) = if in_config {
            ("tokenizer_config.json", &s.tokenizer_config)
        } else {
            ("tokenizer.json", &s.tokenizer)
        };
        let Some(m) = mutate_json(valid, &edit) else { return Ok(()) };
        let dir = model_folder(&[(file, &m.bytes)]);
        match ModelTokenizer::from_dir(dir.path()) {
            Err(e) => {
                // The tokenizers library names no keys of tokenizer.json.
                let m = if in_config { m } else { Mutated { keys: Vec::new(), ..m } };
                check(&e, file, &m, parses_json(&m.bytes))?;
            }
            Ok(t) => {
                for text in ["Guten Tag!", "", "<|im_start|>user\nü€😀<|im_end|>"] {
                    if let Ok(ids) = t.encode_with_special_tokens(text) {
                        let _ = t.decode(&ids);
                        let _ = t.decode_skipping_special(&ids);
                    }
                }
                let _ = (t.bos_id(), t.eos_id(), t.pad_id(), t.vocab_size());
            }
        }
    }
}

/// A chat template: pieces of Jinja and chat markup in random order, or the ChatML template
/// with a random piece inserted and a random span removed.
fn chat_template() -> impl Strategy<Value = String> {
    let piece = prop::sample::select(vec![
        "{{ ",
        " }}",
        "{% ",
        " %}",
        "{# ",
        " #}",
        "for message in messages",
        "endfor",
        "if ",
        "elif ",
        "else",
        "endif",
        "message['role']",
        "message['content']",
        "message.content",
        " + ",
        " | trim",
        " | tojson",
        " | length",
        "add_generation_prompt",
        "bos_token",
        "eos_token",
        "raise_exception('roles must alternate')",
        "loop.index0 % 2",
        " == ",
        " != ",
        "'user'",
        "'assistant'",
        "'system'",
        "<|im_start|>",
        "<|im_end|>",
        "\n",
        "messages[0]",
        "messages[1:]",
        "set ns = namespace(n=0)",
        "ns.n",
        "loop.last",
        " not ",
        " and ",
        "(",
        ")",
        "[",
        "]",
        "'",
        "\"",
        "x",
        "strftime_now('%Y-%m-%d')",
    ]);
    prop_oneof![
        prop::collection::vec(piece.clone(), 0..24).prop_map(|p| p.concat()),
        (any::<Index>(), any::<Index>(), 0usize..12, piece).prop_map(|(at, cut, len, p)| {
            let chatml: Vec<char> = feinschliff::model::new::CHATML_TEMPLATE.chars().collect();
            let mut t = chatml.clone();
            let start = cut.index(t.len());
            t.drain(start..(start + len).min(t.len()));
            let at = at.index(t.len() + 1);
            t.splice(at..at, p.chars());
            t.into_iter().collect()
        }),
    ]
}

proptest! {
    #![proptest_config(settings(512))]

    #[test]
    fn chat_templates_render_or_name_the_file(
        template in chat_template(),
        messages in prop::collection::vec(
            (prop::sample::select(vec!["system", "user", "assistant"]), text()),
            0..5,
        ),
    ) {
        let mut config: Value = serde_json::from_slice(&seeds().tokenizer_config).unwrap();
        config["chat_template"] = Value::from(template);
        let config = serde_json::to_vec_pretty(&config).unwrap();
        let dir = model_folder(&[("tokenizer_config.json", &config)]);
        let tokenizer = ModelTokenizer::from_dir(dir.path()).unwrap();
        let encoder = match Encoder::new(&tokenizer, "model", false) {
            Ok(encoder) => encoder,
            Err(e) => {
                let msg = format!("{e:#}");
                prop_assert!(msg.contains("tokenizer_config.json"), "{msg}");
                return Ok(());
            }
        };
        let messages = messages
            .into_iter()
            .map(|(role, content)| Message { role: role.into(), content })
            .collect();
        if let Err(e) = encoder.encode(&Sample::Chat(messages)) {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains("tokenizer_config.json"), "{msg}");
        }
    }
}

/// A safetensors file with its header edited (or bytes edited within the header), written back
/// with the new header's length.
fn mutate_safetensors(valid: &[u8], edit: &Edit<Value>) -> Option<Mutated> {
    let n = u64::from_le_bytes(valid[..8].try_into().unwrap()) as usize;
    let (header, data) = (&valid[8..8 + n], &valid[8 + n..]);
    match edit {
        Edit::Node(..) => {
            let m = mutate_json(header, edit)?;
            let mut bytes = (m.bytes.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(&m.bytes);
            bytes.extend_from_slice(data);
            Some(Mutated {
                bytes,
                keys: m.keys,
            })
        }
        Edit::Truncate(_) | Edit::Bytes(_) => byte_edit(valid, edit).map(|bytes| Mutated {
            bytes,
            keys: Vec::new(),
        }),
        // Inserted and overwritten bytes land in the length prefix or the header.
        Edit::Insert(..) | Edit::Overwrite(..) => {
            let mut bytes = byte_edit(&valid[..8 + n], edit)?;
            bytes.extend_from_slice(data);
            Some(Mutated {
                bytes,
                keys: Vec::new(),
            })
        }
    }
}

proptest! {
    #![proptest_config(settings(256))]

    #[test]
    fn adapter_configs_load_or_name_file_line_and_key(edit in edit(json_value())) {
        let s = seeds();
        let Some(m) = mutate_json(&s.adapter_config, &edit) else { return Ok(()) };
        let dir = folder(&[
            ("adapter_config.json", &m.bytes),
            ("adapter_model.safetensors", &s.adapter_weights),
        ]);
        let mut model = Model::load(tiny_llama_dir(), None, &Device::Cpu).unwrap();
        if let Err(e) = model.load_adapter(dir.path()) {
            check(&e, "adapter_config.json", &m, parses_json(&m.bytes))?;
        }
    }

}

proptest! {
    #![proptest_config(settings(384))]

    #[test]
    fn safetensors_headers_load_or_name_the_file(
        adapter in any::<bool>(),
        edit in edit(json_value()),
    ) {
        let s = seeds();
        if adapter {
            let Some(m) = mutate_safetensors(&s.adapter_weights, &edit) else { return Ok(()) };
            let dir = folder(&[
                ("adapter_config.json", &s.adapter_config),
                ("adapter_model.safetensors", &m.bytes),
            ]);
            let mut model = Model::load(tiny_llama_dir(), None, &Device::Cpu).unwrap();
            if let Err(e) = model.load_adapter(dir.path()) {
                let msg = format!("{e:#}");
                prop_assert!(msg.contains("adapter_model.safetensors"), "{msg}");
            }
        } else {
            let Some(m) = mutate_safetensors(&s.weights, &edit) else { return Ok(()) };
            let dir = model_folder(&[("model.safetensors", &m.bytes)]);
            if let Err(e) = Model::load(dir.path(), None, &Device::Cpu) {
                let msg = format!("{e:#}");
                prop_assert!(msg.contains("model.safetensors"), "{msg}");
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// What the properties found, as named cases

#[test]
fn a_tokenizer_json_cut_inside_the_decoder_is_an_error_not_a_panic() {
    // tokenizers 0.23 unwraps the decoder's parse result.
    let text = String::from_utf8(seeds().tokenizer.clone()).unwrap();
    let cut = text.find("\"decoder\"").unwrap() + "\"decoder\": {".len() + 3;
    let dir = model_folder(&[("tokenizer.json", &seeds().tokenizer[..cut])]);
    let err = format!("{:#}", ModelTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(
        err.contains("tokenizer.json is not valid JSON") && err.contains("line"),
        "{err}"
    );
}

#[test]
fn text_files_with_invalid_utf8_name_the_line() {
    let mut bytes = RECIPE.as_bytes().to_vec();
    let at = RECIPE.find("r = 4").unwrap() + 4;
    bytes[at] = 0xff;
    let dir = folder(&[("recipe.toml", &bytes)]);
    let err = format!(
        "{:#}",
        Recipe::load(&dir.path().join("recipe.toml"), &[]).unwrap_err()
    );
    assert!(
        err.contains("recipe.toml is not valid UTF-8 at line 8, column 5"),
        "{err}"
    );
    let mut config = seeds().config.clone();
    config[1] = 0x80;
    let dir = model_folder(&[("config.json", &config)]);
    let err = format!(
        "{:#}",
        ModelConfig::from_file(&dir.path().join("config.json")).unwrap_err()
    );
    assert!(
        err.contains("config.json is not valid UTF-8 at line 1, column 2"),
        "{err}"
    );
}

#[test]
fn adapter_errors_name_the_adapter_files() {
    let s = seeds();
    let load = |config: &[u8], weights: &[u8]| -> String {
        let dir = folder(&[
            ("adapter_config.json", config),
            ("adapter_model.safetensors", weights),
        ]);
        let mut model = Model::load(tiny_llama_dir(), None, &Device::Cpu).unwrap();
        format!("{:#}", model.load_adapter(dir.path()).unwrap_err())
    };
    // A rank in adapter_config.json that the tensors do not have.
    let mut config: Value = serde_json::from_slice(&s.adapter_config).unwrap();
    config["r"] = Value::from(3);
    let err = load(&serde_json::to_vec(&config).unwrap(), &s.adapter_weights);
    assert!(
        err.contains("adapter_model.safetensors")
            && err.contains("have rank 2, but")
            && err.contains("adapter_config.json says r = 3"),
        "{err}"
    );
    // A tensor renamed in the safetensors header.
    let name = b"layers.0.self_attn.q_proj.lora_B";
    let at = s
        .adapter_weights
        .windows(name.len())
        .position(|w| w == name)
        .unwrap();
    let mut weights = s.adapter_weights.clone();
    weights[at + name.len() - 1] = b'X';
    let err = load(&s.adapter_config, &weights);
    assert!(
        err.contains("adapter_model.safetensors has only one of"),
        "{err}"
    );
}

#[test]
fn a_chat_template_that_does_not_compile_names_its_file() {
    let mut config: Value = serde_json::from_slice(&seeds().tokenizer_config).unwrap();
    config["chat_template"] = Value::from("{% for m in messages %}{{ m.content }}");
    let dir = model_folder(&[(
        "tokenizer_config.json",
        &serde_json::to_vec(&config).unwrap(),
    )]);
    let tokenizer = ModelTokenizer::from_dir(dir.path()).unwrap();
    let err = format!(
        "{:#}",
        Encoder::new(&tokenizer, "model", false).err().unwrap()
    );
    assert!(
        err.contains("the chat template in")
            && err.contains("tokenizer_config.json")
            && err.contains("does not compile"),
        "{err}"
    );
}

#[test]
fn a_corrupt_parquet_file_is_an_error_not_a_panic() {
    // Eight 0xff bytes in a data page of faq.parquet make polars' bit-unpacking panic.
    let mut bytes = faq_parquet().to_vec();
    bytes[6518..6526].fill(0xff);
    let dir = folder(&[("faq.parquet", &bytes)]);
    let err = read_file(&dir.path().join("faq.parquet"), &ReadOptions::default()).unwrap_err();
    let err = format!("{err:#}");
    assert!(
        err.contains("faq.parquet as parquet: the file is corrupt"),
        "{err}"
    );
}

#[test]
fn decoding_no_tokens_with_a_bpe_decoder_is_empty_text() {
    // tokenizers' BPEDecoder subtracts 1 from the number of tokens.
    let mut tokenizer: Value = serde_json::from_slice(&seeds().tokenizer).unwrap();
    tokenizer["decoder"] = serde_json::json!({"type": "BPEDecoder", "suffix": "</w>"});
    let dir = model_folder(&[("tokenizer.json", &serde_json::to_vec(&tokenizer).unwrap())]);
    let tokenizer = ModelTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.decode(&[]).unwrap(), "");
    assert_eq!(tokenizer.decode_skipping_special(&[]).unwrap(), "");
    let encoder = Encoder::new(&tokenizer, "model", false).unwrap();
    encoder.encode(&Sample::Text("Guten Tag".into())).unwrap();
}

#[test]
fn a_tokenizer_that_panics_on_every_text_is_an_error() {
    // tokenizers 0.23 indexes past the end of any text of two or more characters.
    let mut tokenizer: Value = serde_json::from_slice(&seeds().tokenizer).unwrap();
    tokenizer["normalizer"] = serde_json::json!({"type": "Prepend", "prepend": ""});
    let dir = model_folder(&[("tokenizer.json", &serde_json::to_vec(&tokenizer).unwrap())]);
    let tokenizer = ModelTokenizer::from_dir(dir.path()).unwrap();
    let err = format!("{:#}", tokenizer.encode("Guten Tag").unwrap_err());
    assert!(
        err.contains("tokenization failed: tokenizer.json may hold invalid settings")
            && err.contains("panicked"),
        "{err}"
    );
    let encoder = Encoder::new(&tokenizer, "model", false).unwrap();
    assert!(encoder.encode(&Sample::Text("Guten Tag".into())).is_err());
}

#[test]
fn a_tokenizer_that_panics_while_loading_is_an_error() {
    // tokenizers 0.23 subtracts the prefix's length from shorter tokens' lengths.
    let mut tokenizer: Value = serde_json::from_slice(&seeds().tokenizer).unwrap();
    tokenizer["model"]["continuing_subword_prefix"] = Value::from("__");
    let dir = model_folder(&[("tokenizer.json", &serde_json::to_vec(&tokenizer).unwrap())]);
    let err = format!("{:#}", ModelTokenizer::from_dir(dir.path()).err().unwrap());
    assert!(
        err.contains("cannot load") && err.contains("tokenizer.json") && err.contains("panicked"),
        "{err}"
    );
}
