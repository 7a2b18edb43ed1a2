//! Shared test helpers: tiny models made by the tool itself, in temporary folders.

use candle_core::{DType, Device, Tensor};
use feinschliff::model::new::{config_json, random_weights, Size};
use feinschliff::model::weights::Weights;
use feinschliff::model::{CausalLm, LoraConfig, ModelConfig, ModelTokenizer, TargetModules};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A tiny llama checkpoint written once per test run by `model new` (seed 0).
pub fn tiny_llama_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!(
            "feinschliff-test-tiny-llama-{}",
            std::process::id()
        ));
        if !dir.exists() {
            feinschliff::model::new::create("llama", Size::Tiny, None, 0, &dir, false)
                .expect("model new");
        }
        dir
    })
}

/// A tiny random model in memory, in `dtype`.
pub fn tiny_lm(arch: &str, dtype: DType, seed: u64) -> CausalLm {
    let shape = Size::Tiny.shape();
    let config = ModelConfig::from_json(&config_json(arch, &shape, false).unwrap()).unwrap();
    let weights = Weights::from_tensors(
        random_weights(arch, &shape, false, seed).unwrap(),
        dtype,
        &Device::Cpu,
    );
    CausalLm::load(config, &weights, &Device::Cpu).unwrap()
}

/// A LoRA config on every projection, plain alpha/r scaling.
pub fn all_linear_lora(r: usize, alpha: f64, dropout: f64) -> LoraConfig {
    LoraConfig {
        r,
        alpha,
        dropout,
        target_modules: TargetModules::Pattern("all-linear".into()),
        use_rslora: false,
    }
}

/// Largest absolute difference between two tensors of the same shape, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// Writes `text` to a file in a fresh temporary folder, returning both.
pub fn write_temp(name: &str, text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// A model folder for a tokenizer variant of tests/fixtures/lm_eval_bos: the weights and config
/// of tests/fixtures/lm_eval/model with the variant's tokenizer.json and tokenizer_config.json
/// (as make_lm_eval_bos_fixtures.py assembles it for lm-eval).
pub fn bos_fixture_model(variant: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let fixtures = repo().join("tests/fixtures");
    for f in ["config.json", "generation_config.json", "model.safetensors"] {
        std::fs::copy(fixtures.join("lm_eval/model").join(f), dir.path().join(f)).unwrap();
    }
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        let from = fixtures.join("lm_eval_bos").join(variant).join(f);
        std::fs::copy(from, dir.path().join(f)).unwrap();
    }
    dir
}

/// The ids in a JSON array.
pub fn json_ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as u32)
        .collect()
}

/// Checks `t` against transformers' tokenization of a case (tokenization.json of the gguf and
/// chat_templates fixtures): BOS, EOS and pad strings, and per text the ids without and with
/// special tokens and the decoded ids.
pub fn assert_tokenizes_as(t: &ModelTokenizer, want: &serde_json::Value, case: &str) {
    for (field, got) in [
        ("bos_token", &t.bos_token),
        ("eos_token", &t.eos_token),
        ("pad_token", &t.pad_token),
    ] {
        assert_eq!(got.as_deref(), want[field].as_str(), "{case}: {field}");
    }
    for sample in want["texts"].as_array().unwrap() {
        let text = sample["text"].as_str().unwrap();
        let ids = json_ids(&sample["ids"]);
        assert_eq!(t.encode(text).unwrap(), ids, "{case}: {text:?}");
        assert_eq!(
            t.encode_with_special_tokens(text).unwrap(),
            json_ids(&sample["ids_with_special_tokens"]),
            "{case}: {text:?} with special tokens"
        );
        let decoded = t.decode(&ids).unwrap();
        assert_eq!(
            decoded,
            sample["decoded"].as_str().unwrap(),
            "{case}: decoding"
        );
    }
}

/// The ids of an example's tokens that carry a label (the ones it trains on).
pub fn trained_ids(e: &feinschliff::data::Example) -> Vec<u32> {
    e.input_ids
        .iter()
        .zip(&e.labels)
        .filter(|(_, &l)| l >= 0)
        .map(|(&i, _)| i)
        .collect()
}

/// Width, height and the number of pixels that are not white of the PNG at `path`; fails unless
/// the file is a whole, valid PNG.
pub fn png_pixels(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is no PNG",
        path.display()
    );
    let pixmap = resvg::tiny_skia::Pixmap::decode_png(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let inked = pixmap
        .pixels()
        .iter()
        .filter(|p| (p.red(), p.green(), p.blue()) != (255, 255, 255))
        .count();
    (pixmap.width(), pixmap.height(), inked)
}

/// Keeps a copy of `file` where a person can open it after the tests:
/// `target/test-artifacts/<name>`.
pub fn keep_artifact(file: &Path, name: &str) {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(file, dir.join(name)).unwrap();
}

/// Seeded standard-normal values of shape `dims`, in f64.
pub fn random(dims: &[usize], seed: u64) -> Tensor {
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let n = dims.iter().product();
    let values: Vec<f64> = (0..n)
        .map(|_| rand_distr::StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

/// Largest |a − b| relative to the largest |b|.
pub fn relative_diff(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    max_abs_diff(a, b) / scale.max(1e-30)
}
