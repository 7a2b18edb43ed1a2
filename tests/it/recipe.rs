//! Recipe errors name the file, line and key and say what is allowed; overrides apply.

use feinschliff::recipe::{Recipe, Schedule};

use super::common::write_temp;

const GOOD: &str = r#"
[model]
base = "model"

[lora]
r = 4
alpha = 8

[[data.train]]
path = "train.jsonl"

[train]
lr = 1e-3
max_steps = 3

[output]
dir = "out"
"#;

#[test]
fn a_valid_recipe_loads_with_defaults() {
    let (_dir, path) = write_temp("r.toml", GOOD);
    let r = Recipe::load(&path, &[]).unwrap();
    assert_eq!(r.lora.r, 4);
    assert_eq!(r.train.lr, 1e-3);
    assert_eq!(r.train.lr_schedule, Schedule::Cosine);
    assert_eq!(r.data.max_seq_len, 512);
    assert_eq!(
        r.resolve("train.jsonl"),
        path.parent().unwrap().join("train.jsonl")
    );
}

#[test]
fn unknown_key_names_file_line_and_allowed_keys() {
    let (_dir, path) = write_temp(
        "bad.toml",
        &GOOD.replace("lr = 1e-3", "learning_rate = 1e-3"),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("line 13"), "{err}");
    assert!(err.contains("unknown field `learning_rate`"), "{err}");
    assert!(err.contains("`lr`"), "should list allowed keys: {err}");
}

#[test]
fn bad_value_names_section_key_and_line() {
    let (_dir, path) = write_temp("r.toml", &GOOD.replace("r = 4", "r = 0"));
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("line 6") && err.contains("[lora] r") && err.contains("at least 1"),
        "{err}"
    );

    let (_dir, path) = write_temp("r.toml", &GOOD.replace("lr = 1e-3", "lr = \"fast\""));
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("line 13") && err.contains("invalid type"),
        "{err}"
    );

    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace(
            "max_steps = 3",
            "max_steps = 3\nlr_schedule = \"exponential\"",
        ),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("exponential") && err.contains("cosine"),
        "{err}"
    );

    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace("max_steps = 3", "max_steps = 3\ndevice = \"tpu\""),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("[train] device") && err.contains("cuda:N"),
        "{err}"
    );
}

#[test]
fn export_dtype_and_quant_only_where_the_format_takes_them() {
    for (export, key) in [
        ("format = \"gguf\"\ndtype = \"bf16\"", "[export] dtype"),
        ("quant = \"q8_0\"", "[export] quant"),
    ] {
        let recipe = format!("{GOOD}\n[export]\nout = \"merged\"\n{export}\n");
        let (_dir, path) = write_temp("r.toml", &recipe);
        let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
        assert!(err.contains(key) && err.contains("line"), "{err}");
    }
}

#[test]
fn missing_section_is_named() {
    let (_dir, path) = write_temp("r.toml", "[model]\nbase = \"m\"\n[output]\ndir = \"o\"\n");
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(err.contains("missing field `data`"), "{err}");
}

#[test]
fn a_quantized_base_checkpoints_its_layers_unless_the_recipe_says_otherwise() {
    let (_dir, path) = write_temp("r.toml", GOOD);
    let checkpointing = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Recipe::load(&path, &sets)
            .unwrap()
            .train
            .gradient_checkpointing
    };
    assert_eq!(checkpointing(&[]), Some(false));
    assert_eq!(checkpointing(&["model.quantize=\"q4_0\""]), Some(true));
    assert_eq!(
        checkpointing(&[
            "model.quantize=\"nf4\"",
            "train.gradient_checkpointing=false"
        ]),
        Some(false)
    );
    assert_eq!(
        checkpointing(&["train.gradient_checkpointing=true"]),
        Some(true)
    );
}

#[test]
fn set_overrides_values_and_rejects_unknown_keys() {
    let (_dir, path) = write_temp("r.toml", GOOD);
    let r = Recipe::load(
        &path,
        &[
            "train.lr=5e-5".into(),
            "lora.target_modules=[\"q_proj\"]".into(),
            "output.dir=elsewhere".into(),
        ],
    )
    .unwrap();
    assert_eq!(r.train.lr, 5e-5);
    assert_eq!(r.output.dir, "elsewhere");
    assert_eq!(
        r.lora.target_modules,
        feinschliff::model::TargetModules::Names(vec!["q_proj".into()])
    );
    let err = format!(
        "{:#}",
        Recipe::load(&path, &["train.lrr=1".into()]).unwrap_err()
    );
    assert!(err.contains("--set") && err.contains("lrr"), "{err}");
    let err = format!(
        "{:#}",
        Recipe::load(&path, &["train.lr".into()]).unwrap_err()
    );
    assert!(err.contains("section.key=value"), "{err}");
}

#[test]
fn resolved_recipe_round_trips() {
    let (_dir, path) = write_temp("r.toml", GOOD);
    let r = Recipe::load(&path, &[]).unwrap();
    let (_d2, again) = write_temp("again.toml", &r.to_toml().unwrap());
    let r2 = Recipe::load(&again, &[]).unwrap();
    assert_eq!(r2.to_toml().unwrap(), r.to_toml().unwrap());
}

#[test]
fn hub_id_and_allow_local_base_are_checked() {
    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace(
            "base = \"model\"",
            "base = \"model\"\nhub_id = \"acme/tiny\"",
        ),
    );
    assert_eq!(
        Recipe::load(&path, &[]).unwrap().model.hub_id.as_deref(),
        Some("acme/tiny")
    );
    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace(
            "base = \"model\"",
            "base = \"model\"\nhub_id = \"/models/tiny\"",
        ),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("line 4") && err.contains("[model] hub_id") && err.contains("org/name"),
        "{err}"
    );
    let (_dir, path) = write_temp(
        "r.toml",
        &format!("{GOOD}\n[publish]\nrepo = \"acme/x\"\nallow_local_base = true\n"),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("[publish] allow_local_base") && err.contains("private"),
        "{err}"
    );
}

#[test]
fn workbook_options_on_other_sources_name_the_field() {
    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace(
            "path = \"train.jsonl\"",
            "path = \"faq.csv\"\nsheet = \"FAQ\"",
        ),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(
        err.contains("r.toml") && err.contains("`sheet`") && err.contains("`csv`"),
        "{err}"
    );
    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace(
            "path = \"train.jsonl\"",
            "hub = \"org/faq\"\nheader_row = 2",
        ),
    );
    let err = format!("{:#}", Recipe::load(&path, &[]).unwrap_err());
    assert!(err.contains("`header_row`"), "{err}");
    let (_dir, path) = write_temp(
        "r.toml",
        &GOOD.replace(
            "path = \"train.jsonl\"",
            "path = \"daten/*.xlsx\"\nsheet = 1\nheader_row = 2",
        ),
    );
    let r = Recipe::load(&path, &[]).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        r.data.train[0].sheet,
        Some(feinschliff::data::excel::SheetRef::Index(1))
    );
}
