//! llama.cpp's GGUF format. [`open`] reads a file as a base checkpoint: config from its metadata,
//! tensors dequantised and renamed to transformers' names (llama's Q/K rotary permutation undone),
//! tokenizer rebuilt from `tokenizer.ggml.*`; everything is checked before any tensor is read, and
//! every error names the file and the key or tensor at fault. [`write`] writes a model the other way.

mod architecture;
mod metadata;
mod tensors;
mod token_type;
mod tokenizer;
mod write;

pub use write::{write, Quant};

use anyhow::{anyhow, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::{DType, Device};
use std::path::Path;

use super::parts::Parts;
use super::weights::Weights;

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
    let config = super::config::ModelConfig::from_json(&config_json)
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
