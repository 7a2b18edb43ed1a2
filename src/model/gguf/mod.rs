//! llama.cpp's GGUF format. [`open`] reads a file as a base checkpoint: config from its metadata,
//! tensors dequantised and renamed to transformers' names (llama's Q/K rotary permutation undone),
//! tokenizer rebuilt from `tokenizer.ggml.*`; everything is checked before any tensor is read, and
//! every error names the file and the key or tensor at fault. [`write`] writes a model the other way.

mod metadata;
mod tensors;
mod tokenizer;
mod write;

pub use write::{write, Quant};

/// llama.cpp's architectures and the transformers `model_type`s written as each; a file is read
/// as the first of them.
const ARCHITECTURES: &[(&str, &[&str])] = &[
    ("llama", &["llama", "mistral"]),
    ("qwen2", &["qwen2"]),
    ("qwen3", &["qwen3"]),
];

/// The `model_type` a file of llama.cpp architecture `arch` loads as.
fn model_type_of(arch: &str) -> Option<&'static str> {
    ARCHITECTURES
        .iter()
        .find(|(a, _)| *a == arch)
        .map(|(_, types)| types[0])
}

/// The llama.cpp architecture a model of `model_type` is written as.
fn architecture_of(model_type: &str) -> Option<&'static str> {
    ARCHITECTURES
        .iter()
        .find(|(_, types)| types.contains(&model_type))
        .map(|(a, _)| *a)
}

/// Whether llama.cpp permutes the Q/K rows of architecture `arch` (the Llama architecture only:
/// its RoPE pairs adjacent values).
fn permutes_qk(arch: &str) -> bool {
    arch == "llama"
}

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use std::path::Path;

use super::weights::Weights;
use super::Parts;

/// The magic number every GGUF file starts with.
const MAGIC: &[u8; 4] = b"GGUF";

/// Whether `path` is a file that starts like a GGUF file.
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == MAGIC
}

/// Opens the GGUF file at `path`: config, tensors (converted to `dtype` on `device`) and tokenizer.
pub fn open(path: &Path, dtype: DType, device: &Device) -> Result<Parts> {
    let at = || format!("GGUF file {}", path.display());
    let mut file = std::fs::File::open(path).with_context(|| format!("cannot open {}", at()))?;
    let content = crate::failure::caught(|| Content::read(&mut file))
        .and_then(|r| r.map_err(|e| anyhow!("{e}")))
        .map_err(|e| anyhow!("{}: cannot read the header: {}", at(), tensors::explain(e)))?;
    let size = file
        .metadata()
        .with_context(|| format!("cannot read the size of {}", at()))?
        .len();
    let meta = metadata::Metadata::new(&content);
    let config_json = meta.config_json(&content).with_context(at)?;
    let config = super::ModelConfig::from_json(&config_json)
        .with_context(|| format!("{}: the config its metadata describes", at()))?;
    let expected = tensors::expected(&config, &meta).with_context(at)?;
    let tokenizer = tokenizer::build(&meta, path).with_context(at);
    let mut content = content;
    // The tokenizer's arrays are not needed again; the tensor index is.
    content.metadata.clear();
    // The tensors are checked first: a file that is cut short fails on them, not on its tokenizer.
    let layout = tensors::Layout::check(path, content, expected, &config.model_type, size)
        .with_context(at)?;
    let tokenizer = tokenizer?;
    let storage = layout.describe();
    Ok(Parts {
        config,
        config_json,
        weights: Weights::from_reader(path, Box::new(layout), dtype, device),
        tokenizer: Some(tokenizer),
        storage,
    })
}
