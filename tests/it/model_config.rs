//! config.json: a field of the wrong type is an error naming the file and the field, never a
//! silent default; absent fields take transformers' defaults.

use feinschliff::model::config::RopeScaling;
use feinschliff::model::ModelConfig;
use serde_json::{json, Value};

use super::common::{repo, write_temp};

/// A parity fixture's config.json (transformers 4.57 layout) with `edit` applied.
fn config_with(
    case: &str,
    edit: impl FnOnce(&mut Value),
) -> (tempfile::TempDir, std::path::PathBuf) {
    let path = repo()
        .join("tests/fixtures/parity")
        .join(case)
        .join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut config);
    write_temp("config.json", &config.to_string())
}

fn error(case: &str, edit: impl FnOnce(&mut Value)) -> String {
    let (_dir, path) = config_with(case, edit);
    let err = format!("{:#}", ModelConfig::from_file(&path).unwrap_err());
    assert!(err.contains(&path.display().to_string()), "{err}");
    err
}

#[test]
fn wrongly_typed_fields_are_errors_naming_the_field() {
    let cases: [(&str, &str, Value, &str); 9] = [
        ("llama_linear", "rope_theta", json!("abc"), "`rope_theta`"),
        (
            "llama_linear",
            "rms_norm_eps",
            json!("1e-6"),
            "`rms_norm_eps`",
        ),
        (
            "llama_linear",
            "tie_word_embeddings",
            json!("false"),
            "`tie_word_embeddings`",
        ),
        (
            "llama_linear",
            "num_key_value_heads",
            json!(2.5),
            "`num_key_value_heads`",
        ),
        ("llama_linear", "model_type", json!(7), "`model_type`"),
        (
            "llama_linear",
            "attention_bias",
            json!("no"),
            "`attention_bias`",
        ),
        (
            "llama_linear",
            "rope_scaling",
            json!("linear"),
            "`rope_scaling`",
        ),
        ("mistral", "sliding_window", json!("8"), "`sliding_window`"),
        (
            "qwen2",
            "use_sliding_window",
            json!("no"),
            "`use_sliding_window`",
        ),
    ];
    for (case, field, value, named) in cases {
        let err = error(case, |c| c[field] = value);
        assert!(err.contains(named), "{case} {field}: {err}");
    }
    let err = error("llama_linear", |c| c["rope_scaling"]["factor"] = json!("4"));
    assert!(err.contains("`rope_scaling.factor`"), "{err}");
    let err = error("llama3", |c| {
        c["rope_parameters"] = json!({"rope_type": "llama3", "rope_theta": "5e5"});
        c.as_object_mut().unwrap().remove("rope_scaling");
    });
    assert!(err.contains("`rope_parameters.rope_theta`"), "{err}");
}

#[test]
fn absent_and_null_fields_take_transformers_defaults() {
    let (_dir, path) = config_with("llama_linear", |c| {
        let c = c.as_object_mut().unwrap();
        for key in [
            "rope_theta",
            "rms_norm_eps",
            "tie_word_embeddings",
            "num_key_value_heads",
        ] {
            c.remove(key);
        }
        c.insert("rope_scaling".into(), Value::Null);
    });
    let config = ModelConfig::from_file(&path).unwrap();
    assert_eq!(config.rope_theta, 10_000.0);
    assert_eq!(config.rms_norm_eps, 1e-6);
    assert!(!config.tie_word_embeddings);
    assert_eq!(config.num_key_value_heads, config.num_attention_heads);
    assert_eq!(config.rope_scaling, RopeScaling::None);
}

/// Phi-3 options Feinschliff cannot honour, and longrope tables that do not fit the heads, are
/// errors that name the field and the fix.
#[test]
fn unsupported_phi3_options_are_clear_errors() {
    let err = error("phi3", |c| c["resid_pdrop"] = json!(0.1));
    assert!(
        err.contains("`resid_pdrop`") && err.contains("0.0"),
        "{err}"
    );
    let err = error("phi3", |c| {
        c.as_object_mut()
            .unwrap()
            .remove("original_max_position_embeddings");
    });
    assert!(err.contains("`original_max_position_embeddings`"), "{err}");
    let err = error("phi3", |c| {
        c["rope_scaling"]["short_factor"] = json!([1.0, 1.0, 1.0])
    });
    assert!(
        err.contains("short_factor") && err.contains("2 entries"),
        "{err}"
    );
    let err = error("phi3", |c| c["rope_scaling"]["long_factor"] = json!("3"));
    assert!(err.contains("`rope_scaling.long_factor`"), "{err}");
    let err = error("phi3", |c| c["partial_rotary_factor"] = json!(1.5));
    assert!(err.contains("partial_rotary_factor"), "{err}");
}

/// LongRoPE's attention factor: √(1 + ln(max/original) / ln original), unless given.
#[test]
fn phi3_longrope_attention_factor_follows_transformers() {
    let (_dir, path) = config_with("phi3", |_| {});
    let config = ModelConfig::from_file(&path).unwrap();
    assert_eq!(config.rotary_dim, 4);
    assert!(config.fused_projections);
    let RopeScaling::LongRope {
        attention_factor,
        original_max_position_embeddings,
        ..
    } = config.rope_scaling
    else {
        panic!("{:?}", config.rope_scaling)
    };
    assert_eq!(original_max_position_embeddings, 8);
    let expected = (1.0 + (256.0f64 / 8.0).ln() / 8.0f64.ln()).sqrt();
    assert!((attention_factor - expected).abs() < 1e-12);
}

/// Gemma 2 options Feinschliff cannot honour are errors naming the field.
#[test]
fn unsupported_gemma2_options_are_clear_errors() {
    let err = error("gemma2", |c| c["hidden_activation"] = json!("relu"));
    assert!(
        err.contains("`hidden_activation`") && err.contains("gelu_pytorch_tanh"),
        "{err}"
    );
    let err = error("gemma2", |c| {
        c["layer_types"] = json!(["sliding_attention", "chunked"])
    });
    assert!(err.contains("`layer_types[1]`"), "{err}");
    let err = error("gemma2", |c| c["layer_types"] = json!(["full_attention"]));
    assert!(
        err.contains("layer_types") && err.contains("num_hidden_layers"),
        "{err}"
    );
    let err = error("gemma2", |c| c["attn_logit_softcapping"] = json!("50"));
    assert!(err.contains("`attn_logit_softcapping`"), "{err}");
    let err = error("gemma2", |c| c["use_bidirectional_attention"] = json!(true));
    assert!(err.contains("`use_bidirectional_attention`"), "{err}");
}

/// Gemma 3: the sliding layers' RoPE must be plain; config.json fields Gemma leaves out take
/// Gemma3TextConfig's defaults.
#[test]
fn gemma3_rope_layouts_and_defaults() {
    let err = error("gemma3", |c| {
        c["rope_parameters"] = json!({
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        });
    });
    assert!(
        err.contains("`rope_parameters.sliding_attention.rope_type`"),
        "{err}"
    );
    let (_dir, path) = config_with("gemma3", |c| {
        let c = c.as_object_mut().unwrap();
        for key in [
            "rope_theta",
            "rope_local_base_freq",
            "layer_types",
            "query_pre_attn_scalar",
        ] {
            c.remove(key);
        }
        c.insert("num_hidden_layers".into(), json!(12));
    });
    let config = ModelConfig::from_file(&path).unwrap();
    assert_eq!(config.rope_theta, 1_000_000.0);
    assert_eq!(config.local_rope_theta, Some(10_000.0));
    assert_eq!(config.attention_scale, 1.0 / 16.0);
    let global: Vec<usize> = (0..12)
        .filter(|&i| !config.sliding_layers.as_ref().unwrap()[i])
        .collect();
    assert_eq!(global, [5, 11]);
}

/// Gemma 3 multimodal: config.json as google/gemma-3-4b-it ships it, whose `text_config` names
/// only what differs from Gemma3TextConfig; the defaults fill the rest, the dtype comes from the
/// top level, and the logits are never capped (Gemma3ForConditionalGeneration ignores
/// `final_logit_softcapping`). A `text_config` that is no object, or a bidirectional one, is refused.
#[test]
fn gemma3_multimodal_config_reads_text_config_with_defaults() {
    let gemma_3_4b_it = json!({
        "architectures": ["Gemma3ForConditionalGeneration"],
        "boi_token_index": 255_999,
        "eoi_token_index": 256_000,
        "eos_token_id": [1, 106],
        "image_token_index": 262_144,
        "initializer_range": 0.02,
        "mm_tokens_per_image": 256,
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": 2560,
            "intermediate_size": 10240,
            "model_type": "gemma3_text",
            "num_hidden_layers": 34,
            "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
            "sliding_window": 1024,
            "final_logit_softcapping": 30.0
        },
        "torch_dtype": "bfloat16",
        "vision_config": {
            "hidden_size": 1152,
            "image_size": 896,
            "intermediate_size": 4304,
            "model_type": "siglip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": 27,
            "patch_size": 14,
            "vision_use_head": false
        }
    });
    let c = ModelConfig::from_json(&gemma_3_4b_it).unwrap();
    assert_eq!(c.model_type, "gemma3");
    assert!(c.text_model.is_nested());
    assert_eq!(c.text_model.decoder, "model.language_model");
    assert_eq!(
        (
            c.vocab_size,
            c.hidden_size,
            c.intermediate_size,
            c.num_hidden_layers
        ),
        (262_208, 2560, 10240, 34)
    );
    assert_eq!(
        (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
        (8, 4, 256)
    );
    assert_eq!(c.max_position_embeddings, 131_072);
    assert_eq!(c.attention_scale, 1.0 / 16.0);
    assert_eq!(c.sliding_window, Some(1024));
    assert_eq!(c.rope_theta, 1_000_000.0);
    assert_eq!(c.rope_scaling, RopeScaling::Linear { factor: 8.0 });
    assert_eq!(c.local_rope_theta, Some(10_000.0));
    assert!(c.tie_word_embeddings && c.qk_norm && c.sandwich_norms && c.norm_gain_offset);
    assert_eq!(c.final_logit_softcapping, None);
    assert_eq!(c.torch_dtype.as_deref(), Some("bfloat16"));
    let sliding = c.sliding_layers.clone().unwrap();
    let global: Vec<usize> = (0..34).filter(|&i| !sliding[i]).collect();
    assert_eq!(global, [5, 11, 17, 23, 29]);
    // Its text model as Gemma3ForCausalLM would read it: the same decoder, but alone and capped.
    let mut text = gemma_3_4b_it["text_config"].clone();
    text["torch_dtype"] = json!("bfloat16");
    let alone = ModelConfig::from_json(&text).unwrap();
    assert_eq!(alone.final_logit_softcapping, Some(30.0));
    assert!(!alone.text_model.is_nested());
    let err = error("gemma3_mm", |c| c["text_config"] = json!([1, 2]));
    assert!(err.contains("`text_config`"), "{err}");
    let err = error("gemma3_mm", |c| {
        c["text_config"]["use_bidirectional_attention"] = json!(true)
    });
    assert!(
        err.contains("`text_config`") && err.contains("`use_bidirectional_attention`"),
        "{err}"
    );
    let err = error("gemma3_mm", |c| {
        c["text_config"]["hidden_size"] = json!("32")
    });
    assert!(
        err.contains("`text_config`") && err.contains("`hidden_size`"),
        "{err}"
    );
}
