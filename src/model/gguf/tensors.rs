//! The tensors of a GGUF file under transformers' names: llama.cpp's name of each (used both ways),
//! the shape the metadata implies (checked before reading), the supported storage types, and the
//! reading itself (dequantised by candle, llama.cpp's Q/K rotary permutation undone).

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use candle_core::{Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::metadata::Metadata;
use crate::model::config::ModelConfig;
use crate::model::kernels::quant::Quantization;
use crate::model::layout::{self, Role};
use crate::model::weights::TensorReader;

/// The storage types read, with llama.cpp's names; others are refused by name.
const SUPPORTED: &[(GgmlDType, &str)] = &[
    (GgmlDType::F32, "F32"),
    (GgmlDType::F16, "F16"),
    (GgmlDType::BF16, "BF16"),
    (GgmlDType::Q8_0, "Q8_0"),
    (GgmlDType::Q4_0, "Q4_0"),
    (GgmlDType::Q4_1, "Q4_1"),
    (GgmlDType::Q5_0, "Q5_0"),
    (GgmlDType::Q5_1, "Q5_1"),
    (GgmlDType::Q4K, "Q4_K"),
    (GgmlDType::Q5K, "Q5_K"),
    (GgmlDType::Q6K, "Q6_K"),
];

/// llama.cpp's type ids of the types candle cannot read at all, for messages.
const UNREADABLE: &[(u32, &str)] = &[
    (4, "Q4_2 (removed)"),
    (5, "Q4_3 (removed)"),
    (16, "IQ2_XXS"),
    (17, "IQ2_XS"),
    (18, "IQ3_XXS"),
    (19, "IQ1_S"),
    (20, "IQ4_NL"),
    (21, "IQ3_S"),
    (22, "IQ2_S"),
    (23, "IQ4_XS"),
    (24, "I8"),
    (25, "I16"),
    (26, "I32"),
    (27, "I64"),
    (28, "F64"),
    (29, "IQ1_M"),
    (34, "TQ1_0"),
    (35, "TQ2_0"),
    (39, "MXFP4"),
];

fn type_name(t: GgmlDType) -> String {
    SUPPORTED
        .iter()
        .find(|(s, _)| *s == t)
        .map_or_else(|| format!("{t:?}"), |(_, n)| n.to_string())
}

fn supported_names() -> String {
    SUPPORTED
        .iter()
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join(", ")
}

/// candle's header error without the backtrace candle appends under RUST_BACKTRACE, and with the
/// llama.cpp name of an unknown tensor type and what is supported.
pub fn explain(e: anyhow::Error) -> String {
    let full = e.to_string();
    let text = full.lines().next().unwrap_or_default().to_string();
    if text.contains("failed to fill whole buffer") || text.contains("remaining") {
        return format!("the file is truncated: it ends inside its header ({text})");
    }
    let Some(id) = text
        .strip_prefix("unknown dtype for tensor ")
        .and_then(|n| n.trim().parse::<u32>().ok())
    else {
        return text;
    };
    let name = UNREADABLE
        .iter()
        .find(|(i, _)| *i == id)
        .map_or("not a type llama.cpp defines", |(_, n)| n);
    format!(
        "a tensor has storage type {id} ({name}), which is not supported (supported: {})",
        supported_names()
    )
}

/// One tensor as the metadata implies it: its names, the shape (each dimension with the metadata
/// key it comes from), and the heads of a Q or K projection (weight or bias) whose rows llama.cpp
/// permuted.
pub struct Expected {
    gguf: String,
    hf: String,
    dims: Vec<(usize, String)>,
    unpermute_heads: Option<usize>,
}

/// A checked tensor: what was expected, and its storage type.
struct Entry {
    expected: Expected,
    dtype: GgmlDType,
}

/// The tensors of one file, mapped to transformers' names and checked; read on demand.
pub struct Layout {
    path: PathBuf,
    content: Content,
    entries: BTreeMap<String, Entry>,
}

impl Layout {
    /// Checks that every `expected` tensor is present, with a supported storage type, the shape
    /// the metadata implies, and its bytes inside the file (`size` bytes long); and that no other
    /// tensor is.
    pub fn check(
        path: &Path,
        content: Content,
        expected: Vec<Expected>,
        model_type: &str,
        size: u64,
    ) -> Result<Self> {
        let mut entries = BTreeMap::new();
        for expected in expected {
            let Expected { gguf, hf, dims, .. } = &expected;
            let info = content
                .tensor_infos
                .get(gguf)
                .with_context(|| format!("tensor `{gguf}` (transformers' `{hf}`) is missing"))?;
            let dtype = info.ggml_dtype;
            if !SUPPORTED.iter().any(|(t, _)| *t == dtype) {
                bail!(
                    "tensor `{gguf}` has storage type {}, which is not supported (supported: {})",
                    type_name(dtype),
                    supported_names()
                );
            }
            let stored = info.shape.dims();
            if stored.len() != dims.len() || stored.iter().zip(dims).any(|(s, (d, _))| s != d) {
                let said: Vec<String> = dims.iter().map(|(d, k)| format!("{d} (`{k}`)")).collect();
                bail!(
                    "tensor `{gguf}` has shape {stored:?}, but the metadata says [{}]",
                    said.join(", ")
                );
            }
            let row = stored.last().copied().unwrap_or(1);
            if !row.is_multiple_of(dtype.block_size()) {
                bail!(
                    "tensor `{gguf}` has rows of {row} values, not a multiple of the {} block size {}",
                    type_name(dtype),
                    dtype.block_size()
                );
            }
            let bytes = (info.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64;
            let end = content
                .tensor_data_offset
                .saturating_add(info.offset)
                .saturating_add(bytes);
            if end > size {
                bail!(
                    "the file is truncated: tensor `{gguf}` ends at byte {end}, the file has {size}"
                );
            }
            entries.insert(hf.clone(), Entry { expected, dtype });
        }
        if let Some(extra) = content
            .tensor_infos
            .keys()
            .filter(|name| !entries.values().any(|e| &e.expected.gguf == *name))
            .min()
        {
            bail!("tensor `{extra}` has no place in a {model_type} model of this config");
        }
        Ok(Self {
            path: path.to_path_buf(),
            content,
            entries,
        })
    }

    /// The storage types and how many tensors have each, e.g. `GGUF Q4_K ×14, F32 ×5`.
    pub fn describe(&self) -> String {
        let mut counts: BTreeMap<String, usize> = BTreeMap::new();
        for e in self.entries.values() {
            *counts.entry(type_name(e.dtype)).or_default() += 1;
        }
        let parts: Vec<String> = counts.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
        format!("GGUF {}", parts.join(", "))
    }
}

impl TensorReader for Layout {
    fn names(&self) -> Vec<String> {
        self.entries.keys().cloned().collect()
    }

    fn shape_of(&self, name: &str) -> Option<Vec<usize>> {
        let e = self.entries.get(name)?;
        Some(e.expected.dims.iter().map(|(d, _)| *d).collect())
    }

    /// Reads, dequantises and (for llama's Q/K) un-permutes one tensor.
    fn read(&self, name: &str) -> Result<Tensor> {
        let e = self
            .entries
            .get(name)
            .with_context(|| format!("no tensor `{name}`"))?;
        let gguf = &e.expected.gguf;
        let cpu = Device::Cpu;
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let t = self
            .content
            .tensor(&mut file, gguf, &cpu)
            .and_then(|q| q.dequantize(&cpu))
            .with_context(|| format!("cannot read tensor `{gguf}` of {}", self.path.display()))?;
        match e.expected.unpermute_heads {
            Some(heads) => permute(&t, heads, false),
            None => Ok(t),
        }
    }

    /// The Q4_0 and Q8_0 blocks of a weight as stored (llama's Q/K rows un-permuted: blocks never
    /// cross rows).
    fn read_blocks(&self, name: &str) -> Result<Option<(Quantization, Vec<u8>)>> {
        let Some(e) = self.entries.get(name) else {
            return Ok(None);
        };
        let (Some(format), [(rows, _), _]) =
            (Quantization::of_gguf(e.dtype), e.expected.dims.as_slice())
        else {
            return Ok(None);
        };
        let gguf = &e.expected.gguf;
        let mut file = std::fs::File::open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        let blocks = self
            .content
            .tensor(&mut file, gguf, &Device::Cpu)
            .and_then(|q| Ok(q.data()?.into_owned()))
            .with_context(|| format!("cannot read tensor `{gguf}` of {}", self.path.display()))?;
        Ok(Some(match e.expected.unpermute_heads {
            Some(heads) => {
                let row_bytes = blocks.len() / rows.max(&1);
                let t = Tensor::from_vec(blocks, (*rows, row_bytes), &Device::Cpu)?;
                let t = permute(&t, heads, false)?;
                (format, t.flatten_all()?.to_vec1::<u8>()?)
            }
            None => (format, blocks),
        }))
    }
}

/// llama.cpp's names of the modules of a decoder layer, by transformers' names.
const LAYER_MODULES: &[(&str, &str)] = &[
    ("input_layernorm", "attn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("self_attn.q_norm", "attn_q_norm"),
    ("self_attn.k_norm", "attn_k_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
];

/// llama.cpp's name of a transformers tensor name (`model.layers.0.mlp.up_proj.weight` ->
/// `blk.0.ffn_up.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?;
    let (_, name) = LAYER_MODULES.iter().find(|(h, _)| *h == module)?;
    Some(format!("blk.{layer}.{name}.{kind}"))
}

/// convert_hf_to_gguf.py's `permute` of llama Q/K rows (`to_gguf`) or its inverse: each head's
/// rows are (half, pair) in transformers' order and (pair, half) in GGUF's.
pub fn permute(t: &Tensor, heads: usize, to_gguf: bool) -> Result<Tensor> {
    let rows = t.dim(0)?;
    let cols = t.elem_count() / rows.max(1);
    let half = rows / heads / 2;
    let grouped = if to_gguf {
        (heads, 2, half, cols)
    } else {
        (heads, half, 2, cols)
    };
    Ok(t.reshape(grouped)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(t.shape())?)
}

/// Every tensor a model of `config` has: llama.cpp name, transformers name, shape with the
/// metadata keys behind each dimension, and the heads of a permuted Q/K projection.
pub fn expected(config: &ModelConfig, meta: &Metadata) -> Result<Vec<Expected>> {
    let c = config;
    let arch = meta.architecture()?;
    let key = |k: &str| format!("{arch}.{k}");
    let (vocab, vocab_key) = meta.vocab()?;
    let hidden = (c.hidden_size, key("embedding_length"));
    let inter = (c.intermediate_size, key("feed_forward_length"));
    let head_dim_key = match meta.head_dim()? {
        Some((_, from)) => from,
        None => format!(
            "{} / {}",
            key("embedding_length"),
            key("attention.head_count")
        ),
    };
    let q = (
        c.num_attention_heads * c.head_dim,
        format!("{} × {head_dim_key}", key("attention.head_count")),
    );
    let kv = (
        c.num_key_value_heads * c.head_dim,
        format!("{} × {head_dim_key}", key("attention.head_count_kv")),
    );
    let head = (c.head_dim, head_dim_key.clone());
    let permuted = super::architecture::permutes_qk(arch);
    let mut out = Vec::new();
    let mut add = |hf: String, dims: Vec<(usize, String)>, heads: Option<usize>| {
        out.push(Expected {
            gguf: gguf_name(&hf).unwrap_or_default(),
            hf,
            dims,
            unpermute_heads: heads,
        })
    };
    add(
        "model.embed_tokens.weight".into(),
        vec![(vocab, vocab_key.clone()), hidden.clone()],
        None,
    );
    for i in 0..c.num_hidden_layers {
        let h = format!("model.layers.{i}");
        for p in layout::projections(c) {
            let (rows, cols) = match p.role {
                Role::Q => (&q, &hidden),
                Role::K | Role::V => (&kv, &hidden),
                Role::O => (&hidden, &q),
                Role::Gate | Role::Up => (&inter, &hidden),
                Role::Down => (&hidden, &inter),
                Role::Qkv | Role::GateUp => bail!(
                    "{arch}: fused projections ({}) have no llama.cpp tensor names",
                    p.role.path()
                ),
            };
            let heads = match p.role {
                Role::Q => permuted.then_some(c.num_attention_heads),
                Role::K => permuted.then_some(c.num_key_value_heads),
                _ => None,
            };
            let name = format!("{h}.{}", p.role.path());
            add(
                format!("{name}.weight"),
                vec![rows.clone(), cols.clone()],
                heads,
            );
            if p.bias {
                add(format!("{name}.bias"), vec![rows.clone()], heads);
            }
        }
        for n in layout::norms(c) {
            let width = match n.path {
                "self_attn.q_norm" | "self_attn.k_norm" => &head,
                _ => &hidden,
            };
            add(format!("{h}.{}.weight", n.path), vec![width.clone()], None);
        }
    }
    add("model.norm.weight".into(), vec![hidden.clone()], None);
    if !c.tie_word_embeddings {
        add(
            "lm_head.weight".into(),
            vec![(vocab, vocab_key), hidden],
            None,
        );
    }
    Ok(out)
}
