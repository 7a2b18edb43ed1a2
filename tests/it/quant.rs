//! `[model] quantize`: Q4_0 and Q8_0 equal gguf-py's and NF4 equals bitsandbytes' bit for bit
//! (codes, scales, dequantised values); the frozen ops on a quantized weight give the outputs and
//! gradients of the same ops on the dense dequantised weight; LoRA training on a quantized tiny
//! Llama and on a quantized GGUF base lowers the loss, and a merged export of it is the
//! dequantised weights plus the adapter; a bad `quantize` is an error naming the field.
//! Fixture: tests/fixtures/quant, made by tests/fixtures/quant/make_quant_fixtures.py.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use feinschliff::model::kernels::frozen_weight::FrozenWeight;
use feinschliff::model::kernels::lora_linear::lora_linear;
use feinschliff::model::kernels::projection_weight::ProjectionWeight;
use feinschliff::model::kernels::quant::{Quantization, QuantizedWeight};
use feinschliff::model::linear::frozen_matmul;
use feinschliff::model::{Model, Parts};

use super::common::{max_abs_diff, relative_diff, repo};
use super::training::{run, write_dataset};

fn fixture() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        repo().join("tests/fixtures/quant/quants.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    let values = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    values
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn bytes(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn q4_0_and_q8_0_equal_gguf_py_bit_for_bit() {
    let f = fixture();
    let w = &f["weight"];
    for format in [Quantization::Q4_0, Quantization::Q8_0] {
        let name = format.name();
        let ours = QuantizedWeight::quantize(w, format, DType::F32, &Device::Cpu).unwrap();
        let theirs = QuantizedWeight::from_gguf(
            format,
            (24, 256),
            &bytes(&f[name]),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(bytes(ours.codes()), bytes(theirs.codes()), "{name}: codes");
        assert_eq!(bits(ours.scales()), bits(theirs.scales()), "{name}: scales");
        let want = bits(&f[&format!("{name}.dequantized")]);
        assert_eq!(
            bits(&ours.dequantize().unwrap()),
            want,
            "{name}: dequantised"
        );
        assert_eq!(
            bits(&theirs.dequantize().unwrap()),
            want,
            "{name}: GGUF blocks dequantised"
        );
        assert_eq!(
            ours.bytes(),
            f[name].elem_count(),
            "{name}: the size of GGUF's blocks"
        );
    }
}

#[test]
fn nf4_equals_bitsandbytes_bit_for_bit() {
    let f = fixture();
    let q = QuantizedWeight::quantize(&f["weight"], Quantization::Nf4, DType::F32, &Device::Cpu)
        .unwrap();
    assert_eq!(bytes(q.codes()), bytes(&f["nf4.packed"]), "packed codes");
    assert_eq!(bits(q.scales()), bits(&f["nf4.absmax"]), "absmax");
    assert_eq!(
        bits(&q.dequantize().unwrap()),
        bits(&f["nf4.dequantized"]),
        "dequantised"
    );
}

#[test]
fn quantized_products_of_the_identity_are_the_dequantised_weight() {
    let f = fixture();
    for format in Quantization::ALL {
        let q = QuantizedWeight::quantize(&f["weight"], format, DType::F32, &Device::Cpu).unwrap();
        let dense = q.dequantize().unwrap();
        let weight = ProjectionWeight::from(q);
        let eye = |n: usize| Tensor::eye(n, DType::F32, &Device::Cpu).unwrap();
        // Exact, but for the sign of zeros (a sum of zeros and one -0 is +0).
        let forward = frozen_matmul(&eye(256), &weight).unwrap();
        assert_eq!(
            max_abs_diff(&forward, &dense.t().unwrap()),
            0.0,
            "{format}: I·Wᵀ"
        );
        let backward = weight.times(&eye(24)).unwrap();
        assert_eq!(max_abs_diff(&backward, &dense), 0.0, "{format}: I·W");
    }
}

#[test]
fn quantized_frozen_ops_equal_the_dense_ops_on_the_dequantised_weight() {
    let dev = Device::Cpu;
    let randn = |shape: (usize, usize)| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
    // A few rows (decoding), a batch below the bf16 kernels' size, and one above it.
    for (n, out, inp) in [(3, 96, 128), (40, 192, 256), (300, 160, 320)] {
        let w = (randn((out, inp)) * 0.05).unwrap();
        let x = Var::from_tensor(&randn((n, inp))).unwrap();
        let a = Var::from_tensor(&(randn((4, inp)) * 0.1).unwrap()).unwrap();
        let b = Var::from_tensor(&(randn((out, 4)) * 0.1).unwrap()).unwrap();
        let weights = randn((n, out));
        let keep: Vec<f32> = (0..n * inp)
            .map(|i| if i % 3 == 0 { 0.0 } else { 1.0 / 0.9 })
            .collect();
        let mask = Tensor::from_vec(keep, (n, inp), &dev).unwrap();
        for format in Quantization::ALL {
            for compute in [DType::F32, DType::BF16] {
                let q = QuantizedWeight::quantize(&w, format, compute, &dev).unwrap();
                let dense = FrozenWeight::new(q.dequantize().unwrap().to_dtype(compute).unwrap());
                let (quantized, dense) = (ProjectionWeight::from(q), ProjectionWeight::from(dense));
                let case = format!("{format} in {compute:?}, {n} × {inp} → {out}");
                let loss = |y: &Tensor| (y * &weights).unwrap().sum_all().unwrap();
                let (yq, yd) = (
                    frozen_matmul(&x, &quantized).unwrap(),
                    frozen_matmul(&x, &dense).unwrap(),
                );
                let diff = relative_diff(&yq, &yd);
                assert!(diff < 1e-5, "{case}: x·Wᵀ differs by {diff}");
                let (gq, gd) = (loss(&yq).backward().unwrap(), loss(&yd).backward().unwrap());
                let diff = relative_diff(gq.get(&x).unwrap(), gd.get(&x).unwrap());
                assert!(diff < 1e-5, "{case}: dx differs by {diff}");
                for mask in [None, Some(&mask)] {
                    let yq = lora_linear(&x, &quantized, &a, &b, 2.0, mask).unwrap();
                    let yd = lora_linear(&x, &dense, &a, &b, 2.0, mask).unwrap();
                    let diff = relative_diff(&yq, &yd);
                    assert!(diff < 1e-5, "{case}, LoRA: output differs by {diff}");
                    let (gq, gd) = (loss(&yq).backward().unwrap(), loss(&yd).backward().unwrap());
                    for (name, var) in [("x", &x), ("A", &a), ("B", &b)] {
                        let diff = relative_diff(gq.get(var).unwrap(), gd.get(var).unwrap());
                        assert!(
                            diff < 1e-5,
                            "{case}, LoRA, mask {}: d{name} differs by {diff}",
                            mask.is_some()
                        );
                    }
                }
            }
        }
    }
}

/// The mean loss of the first and the last five steps of a run's metrics.jsonl.
fn first_and_last_loss(out: &std::path::Path) -> (f64, f64) {
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..5]), mean(&losses[losses.len() - 5..]))
}

#[test]
fn lora_on_a_quantized_tiny_llama_lowers_the_loss_and_merges_into_the_dequantised_base() {
    for (format, dtype) in [("q4_0", "f32"), ("nf4", "bf16")] {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path());
        let set_format = format!("model.quantize={format}");
        let set_dtype = format!("model.dtype={dtype}");
        run(dir.path(), &[&set_format, &set_dtype], false).unwrap_or_else(|e| panic!("{e:#}"));
        let adapter = dir.path().join("out");
        let (first, last) = first_and_last_loss(&adapter);
        assert!(
            last < 0.8 * first,
            "{format}: loss did not fall: {first} -> {last}"
        );
        let resolved = std::fs::read_to_string(adapter.join("recipe.resolved.toml")).unwrap();
        assert!(
            resolved.contains(&format!("quantize = \"{format}\"")),
            "{resolved}"
        );

        // The merged model is base-as-trained (dequantised) + s·B·A, in bf16.
        let merged = dir.path().join("merged");
        let base = feinschliff::export::locate_base(
            &adapter,
            Some(&super::common::tiny_llama_dir().display().to_string()),
            false,
        )
        .unwrap();
        let options = feinschliff::export::MergeOptions {
            adapter: adapter.clone(),
            out: merged.clone(),
            dtype: None,
            max_shard_bytes: 5_000_000_000,
            device: "cpu".into(),
            force: false,
            format: feinschliff::export::merged::Format::Safetensors,
        };
        feinschliff::export::merge(&options, &base).unwrap_or_else(|e| panic!("{e:#}"));
        let name = "model.layers.1.self_attn.q_proj";
        let tensors =
            |p: std::path::PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
        let got = &tensors(merged.join("model.safetensors"))[&format!("{name}.weight")];
        assert_eq!(
            got.dtype(),
            DType::BF16,
            "{format}: a quantized base merges in 16 bits"
        );
        let stored = &tensors(base.dir.join("model.safetensors"))[&format!("{name}.weight")];
        let format: Quantization = format.parse().unwrap();
        let trained = QuantizedWeight::quantize(stored, format, DType::F32, &Device::Cpu)
            .unwrap()
            .dequantize()
            .unwrap();
        let lora = tensors(adapter.join("adapter_model.safetensors"));
        let factor = |which: &str| &lora[&format!("base_model.model.{name}.{which}.weight")];
        // r 8, alpha 16 (the training test's recipe).
        let delta = (factor("lora_B").matmul(factor("lora_A")).unwrap() * 2.0).unwrap();
        let want = (trained + delta).unwrap().to_dtype(DType::BF16).unwrap();
        assert_eq!(bits(got), bits(&want), "{format}: merged {name}");
    }
}

#[test]
fn a_quantized_gguf_base_keeps_its_q4_0_and_q8_0_blocks_and_trains() {
    let gguf = repo().join("tests/fixtures/gguf/llama_quant/model.gguf");
    let model = Model::load_quantized(&gguf, None, Some(Quantization::Q8_0), &Device::Cpu).unwrap();
    let parts = Parts::open(&gguf, DType::F32, &Device::Cpu).unwrap();
    let types: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gguf.with_file_name("weights.json")).unwrap(),
    )
    .unwrap();
    let mut kept = Vec::new();
    for (name, linear) in model.lm.linears() {
        let name = format!("{name}.weight");
        let q = linear
            .weight
            .quantized()
            .unwrap_or_else(|| panic!("{name} is dense"));
        match types[&name]["type"].as_str().unwrap() {
            stored @ ("Q4_0" | "Q8_0") => {
                assert_eq!(q.format().name(), stored.to_lowercase(), "{name}");
                let dense = parts.weights.get(&name, &[q.dims().0, q.dims().1]).unwrap();
                assert_eq!(
                    bits(&q.dequantize().unwrap()),
                    bits(&dense),
                    "{name} as stored"
                );
                kept.push(name);
            }
            _ => assert_eq!(q.format(), Quantization::Q8_0, "{name}"),
        }
    }
    // Among them llama's K projection of layer 0, whose rows GGUF stores permuted.
    assert!(kept.contains(&"model.layers.0.self_attn.k_proj.weight".to_string()));
    assert_eq!(kept.len(), 9, "{kept:?}");

    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    let set_base = format!("model.base={}", gguf.display());
    run(dir.path(), &[&set_base, "model.quantize=q8_0"], false).unwrap_or_else(|e| panic!("{e:#}"));
    let (first, last) = first_and_last_loss(&dir.path().join("out"));
    assert!(last < 0.9 * first, "loss did not fall: {first} -> {last}");
}

#[test]
fn a_bad_quantize_names_the_field_and_the_choices() {
    let dir = tempfile::tempdir().unwrap();
    write_dataset(dir.path());
    for set in ["model.quantize=q5_k", "model.quantize=Q4_0"] {
        let err = format!("{:#}", run(dir.path(), &[set], false).unwrap_err());
        assert!(
            err.contains("[model] quantize") && err.contains("q4_0, q8_0 or nf4"),
            "{set}: {err}"
        );
    }
    let recipe = repo().join("recipes/quickstart.toml");
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("dtype = \"f32\"", "dtype = \"f32\"\nquantize = \"int4\"");
    let (_keep, path) = super::common::write_temp("bad.toml", &text);
    let err = format!(
        "{:#}",
        feinschliff::recipe::Recipe::load(&path, &[]).unwrap_err()
    );
    assert!(
        err.contains("line 9") && err.contains("[model] quantize") && err.contains("`int4`"),
        "{err}"
    );
}
