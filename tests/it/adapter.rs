//! Adapters written in PEFT's format load back to identical logits; PEFT's naming and config.

use candle_core::{DType, Device, Tensor};
use feinschliff::model::{adapter, BaseModel, LoraConfig, Model, TargetModules, TokenLayout};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::common::{max_abs_diff, tiny_llama_dir};

fn logits(model: &Model) -> Tensor {
    let ids = Tensor::new(&[[3u32, 17, 250, 9, 41, 7]], &Device::Cpu).unwrap();
    model
        .lm
        .forward(&ids, &TokenLayout::causal(1, 6), None)
        .unwrap()
}

#[test]
fn adapter_save_load_round_trip_reproduces_logits() {
    let dir = tiny_llama_dir();
    let mut model = Model::load(dir, None, &Device::Cpu).unwrap();
    let config = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.1,
        target_modules: TargetModules::Names(vec!["q_proj".into(), "down_proj".into()]),
        use_rslora: true,
    };
    model.attach_lora(&config, 5).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for (_, var) in model.trainable() {
        let v: Vec<f32> = (0..var.elem_count())
            .map(|_| rng.random_range(-0.3..0.3))
            .collect();
        var.set(&Tensor::from_vec(v, var.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let out = tempfile::tempdir().unwrap();
    let base = BaseModel {
        dir: dir.to_path_buf(),
        hub_id: Some("acme/tiny-llama".into()),
        revision: Some("0123abc".into()),
    };
    model.save_adapter(&base, out.path()).unwrap();

    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["peft_type"], "LORA");
    assert_eq!(json["task_type"], "CAUSAL_LM");
    assert_eq!(json["r"], 4);
    assert_eq!(json["lora_alpha"], 8.0);
    assert_eq!(json["use_rslora"], true);
    assert_eq!(json["bias"], "none");
    assert_eq!(json["fan_in_fan_out"], false);
    assert_eq!(json["base_model_name_or_path"], "acme/tiny-llama");
    assert_eq!(json["revision"], "0123abc");
    assert_eq!(
        json["target_modules"],
        serde_json::json!(["down_proj", "q_proj"])
    );

    let tensors =
        candle_core::safetensors::load(out.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let a = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"];
    let b = &tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"];
    assert_eq!(a.dims(), &[4, 64]);
    assert_eq!(b.dims(), &[64, 4]);
    assert_eq!(tensors.len(), 2 * 2 * 2);

    let mut reloaded = Model::load(dir, None, &Device::Cpu).unwrap();
    reloaded.load_adapter(out.path()).unwrap();
    assert_eq!(max_abs_diff(&logits(&model), &logits(&reloaded)), 0.0);
    let base = Model::load(dir, None, &Device::Cpu).unwrap();
    assert!(
        max_abs_diff(&logits(&base), &logits(&reloaded)) > 1e-4,
        "the adapter changed nothing"
    );
}

#[test]
fn fresh_adapter_follows_peft_init() {
    let mut lm = super::common::tiny_lm("mistral", DType::F32, 0);
    let config = super::common::all_linear_lora(8, 16.0, 0.0);
    let before = lm
        .forward(
            &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
            &TokenLayout::causal(1, 3),
            None,
        )
        .unwrap();
    adapter::attach(&mut lm, &config, 0).unwrap();
    let after = lm
        .forward(
            &Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
            &TokenLayout::causal(1, 3),
            None,
        )
        .unwrap();
    assert_eq!(
        max_abs_diff(&before, &after),
        0.0,
        "B = 0 must leave the model unchanged"
    );
    for (name, linear) in lm.linears() {
        let l = linear
            .lora
            .as_ref()
            .unwrap_or_else(|| panic!("{name} has no adapter"));
        assert_eq!(l.scale, 2.0);
        let a =
            l.a.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
        let bound = 1.0 / (linear.in_features() as f32).sqrt();
        assert!(
            a.iter().all(|v| v.abs() <= bound),
            "{name}: A outside kaiming-uniform bound"
        );
        let spread = a.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert!(spread > 0.8 * bound, "{name}: A does not fill its range");
        assert!(l
            .b
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|&v| v == 0.0));
    }
    let rs = LoraConfig {
        use_rslora: true,
        ..config
    };
    assert!((rs.scale() - 16.0 / 8f64.sqrt()).abs() < 1e-12);
}

#[test]
fn adapter_for_another_base_is_refused() {
    let dir = tiny_llama_dir();
    let mut model = Model::load(dir, None, &Device::Cpu).unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut small = super::common::tiny_lm("llama", DType::F32, 0);
    let config = LoraConfig {
        r: 2,
        alpha: 4.0,
        dropout: 0.0,
        target_modules: TargetModules::Names(vec!["q_proj".into()]),
        use_rslora: false,
    };
    adapter::attach(&mut small, &config, 0).unwrap();
    // Same layer names, wrong shapes: write A with a different in-features count.
    let tensors: Vec<(String, Tensor)> = adapter::trainable(&small)
        .into_iter()
        .map(|(k, v)| {
            let t = v.as_tensor().clone();
            let t = if k.contains("lora_A") {
                Tensor::zeros((2, 32), DType::F32, &Device::Cpu).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect();
    feinschliff::model::weights::save_safetensors(
        &tensors,
        &other.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let base = BaseModel {
        dir: "x".into(),
        hub_id: None,
        revision: None,
    };
    let cfg = adapter::config_json(&config, &config.target_modules, &base);
    std::fs::write(other.path().join("adapter_config.json"), cfg.to_string()).unwrap();
    let err = model.load_adapter(other.path()).unwrap_err().to_string();
    assert!(err.contains("another base model"), "{err}");
}

/// A copy of the llama3 parity fixture's PEFT adapter with `edit` applied to its adapter_config.json,
/// and the error loading it gives (as `--adapter` and `[lora] init_from` load it).
fn adapter_error(edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> String {
    let fixture = super::common::repo().join("tests/fixtures/parity/llama3/adapter");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        fixture.join("adapter_model.safetensors"),
        dir.path().join("adapter_model.safetensors"),
    )
    .unwrap();
    let mut config = adapter::read_config(&fixture).unwrap();
    edit(&mut config);
    let path = dir.path().join("adapter_config.json");
    std::fs::write(&path, serde_json::Value::Object(config).to_string()).unwrap();
    let err = format!(
        "{:#}",
        adapter::load(dir.path(), &Device::Cpu).err().unwrap()
    );
    assert!(err.contains(&path.display().to_string()), "{err}");
    err
}

#[test]
fn adapter_configs_that_leave_the_scale_open_are_refused() {
    let err = adapter_error(|c| {
        c.insert("r".into(), 0.into());
    });
    assert!(
        err.contains("`r` is 0") && err.contains("set it to the adapter's rank"),
        "{err}"
    );
    let err = adapter_error(|c| {
        c.remove("lora_alpha");
    });
    assert!(
        err.contains("`lora_alpha` is missing")
            && err.contains("add the value it was trained with"),
        "{err}"
    );
    for (field, value) in [("r", "4"), ("lora_alpha", "8"), ("use_rslora", "true")] {
        let err = adapter_error(|c| {
            c.insert(field.into(), value.into());
        });
        assert!(err.contains(&format!("field `{field}`")), "{err}");
    }
}
