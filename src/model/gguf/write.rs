//! Writing a model as a GGUF file llama.cpp loads: the config as `<arch>.*` metadata, the tokenizer
//! as `tokenizer.ggml.*` (with the chat template), tensors under llama.cpp's names (llama's Q/K rows
//! permuted as convert_hf_to_gguf.py does), 2-D weights in F16, Q8_0 or llama.cpp's Q4_K_M mix
//! (quantised by candle), norms and biases in F32.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{self, Value as Gguf};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Tensor;
use serde_json::Value;
use std::path::Path;

use super::tensors::{gguf_name, permute};
use super::token_type::{BYTE, CONTROL, NORMAL, UNUSED, USER_DEFINED};
use super::tokenizer::pre_name;
use crate::model::config::ModelConfig;
use crate::model::tokenizer::ModelTokenizer;

/// The storage of the 2-D weights.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum Quant {
    #[default]
    #[serde(rename = "f16")]
    #[value(name = "f16")]
    F16,
    #[serde(rename = "q8_0")]
    #[value(name = "q8_0")]
    Q8_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output projection and for attn_v and
    /// ffn_down in the layers llama.cpp gives more bits.
    #[serde(rename = "q4_k_m")]
    #[value(name = "q4_k_m")]
    Q4KM,
}

impl Quant {
    pub fn name(self) -> &'static str {
        match self {
            Quant::F16 => "f16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4KM => "q4_k_m",
        }
    }

    /// llama.cpp's `general.file_type`.
    fn file_type(self) -> u32 {
        match self {
            Quant::F16 => 1,
            Quant::Q8_0 => 7,
            Quant::Q4KM => 15,
        }
    }
}

/// Writes `tensors` (transformers' names, f32) of a model of `config` with `tokenizer` to `path`.
pub fn write(
    path: &Path,
    name: &str,
    config: &ModelConfig,
    tokenizer: &ModelTokenizer,
    tensors: Vec<(String, Tensor)>,
    quant: Quant,
) -> Result<()> {
    let mut metadata = model_metadata(name, config, quant)?;
    metadata.extend(tokenizer_metadata(tokenizer, config.vocab_size)?);
    let permuted = super::architecture::architecture_of(&config.model_type)
        .is_some_and(super::architecture::permutes_qk);
    let mut stored = Vec::with_capacity(tensors.len());
    for (hf, t) in tensors {
        let gguf = gguf_name(&hf).with_context(|| format!("tensor `{hf}` has no GGUF name"))?;
        let heads = if !permuted {
            None
        } else if hf.contains(".self_attn.q_proj.") {
            Some(config.num_attention_heads)
        } else if hf.contains(".self_attn.k_proj.") {
            Some(config.num_key_value_heads)
        } else {
            None
        };
        let t = match heads {
            Some(h) => permute(&t, h, true)?,
            None => t,
        };
        let dtype = if t.rank() == 1 {
            GgmlDType::F32
        } else {
            storage(&gguf, t.dims()[t.rank() - 1], config, quant)
        };
        let q = QTensor::quantize(&t.to_dtype(candle_core::DType::F32)?, dtype)
            .with_context(|| format!("cannot store tensor `{gguf}` as {dtype:?}"))?;
        stored.push((gguf, q));
    }
    let meta: Vec<(&str, &Gguf)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let refs: Vec<(&str, &QTensor)> = stored.iter().map(|(n, q)| (n.as_str(), q)).collect();
    let file =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    gguf_file::write(&mut w, &meta, &refs)
        .with_context(|| format!("cannot write {}", path.display()))?;
    use std::io::Write as _;
    w.flush()
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The storage of 2-D weight `name` with rows of `row` values in a model of `config`'s shape.
/// Types whose blocks do not divide the row fall back as llama.cpp does (Q4_K to Q5_0, Q6_K and
/// Q5_0 to Q8_0, Q8_0 to F16).
fn storage(name: &str, row: usize, config: &ModelConfig, quant: Quant) -> GgmlDType {
    let layers = config.num_hidden_layers;
    let wanted = match quant {
        Quant::F16 => GgmlDType::F16,
        Quant::Q8_0 => GgmlDType::Q8_0,
        Quant::Q4KM => {
            let layer = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok());
            // llama.cpp's use_more_bits: the first and last eighth of the layers, and every third.
            let more_bits = layer.is_some_and(|i| {
                i < layers / 8 || i >= 7 * layers / 8 || (i - layers / 8) % 3 == 2
            });
            let sensitive = name.contains(".attn_v.") || name.contains(".ffn_down.");
            // The LM head: output.weight, or the embeddings that stand in for it when tied.
            let head = name == "output.weight"
                || (config.tie_word_embeddings && name == "token_embd.weight");
            if head || (sensitive && more_bits) {
                GgmlDType::Q6K
            } else {
                GgmlDType::Q4K
            }
        }
    };
    let mut dtype = wanted;
    while !row.is_multiple_of(dtype.block_size()) {
        dtype = match dtype {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K | GgmlDType::Q5_0 => GgmlDType::Q8_0,
            _ => return GgmlDType::F16,
        };
    }
    dtype
}

/// `general.*` and the `<arch>.*` keys of the config.
fn model_metadata(name: &str, c: &ModelConfig, quant: Quant) -> Result<Vec<(String, Gguf)>> {
    let Some(arch) = super::architecture::architecture_of(&c.model_type) else {
        bail!("cannot write a `{}` model as GGUF", c.model_type);
    };
    if c.sliding_window.is_some() {
        bail!("cannot write a model with a sliding attention window as GGUF");
    }
    let u = |n: usize| Gguf::U32(n as u32);
    let key = |k: &str| format!("{arch}.{k}");
    let mut m = vec![
        ("general.architecture".into(), Gguf::String(arch.into())),
        ("general.name".into(), Gguf::String(name.into())),
        ("general.file_type".into(), Gguf::U32(quant.file_type())),
        (key("vocab_size"), u(c.vocab_size)),
        (key("context_length"), u(c.max_position_embeddings)),
        (key("embedding_length"), u(c.hidden_size)),
        (key("block_count"), u(c.num_hidden_layers)),
        (key("feed_forward_length"), u(c.intermediate_size)),
        (key("attention.head_count"), u(c.num_attention_heads)),
        (key("attention.head_count_kv"), u(c.num_key_value_heads)),
        (key("attention.key_length"), u(c.head_dim)),
        (key("attention.value_length"), u(c.head_dim)),
        (key("rope.dimension_count"), u(c.rotary_dim)),
        (
            key("attention.layer_norm_rms_epsilon"),
            Gguf::F32(c.rms_norm_eps as f32),
        ),
        (key("rope.freq_base"), Gguf::F32(c.rope_theta as f32)),
    ];
    match c.rope_scaling {
        crate::model::config::RopeScaling::None => {}
        crate::model::config::RopeScaling::Linear { factor } => {
            m.push((key("rope.scaling.type"), Gguf::String("linear".into())));
            m.push((key("rope.scaling.factor"), Gguf::F32(factor as f32)));
        }
        crate::model::config::RopeScaling::Llama3 { .. } => {
            bail!("cannot write Llama 3.1 RoPE scaling as GGUF yet (it needs a rope_freqs tensor)")
        }
        crate::model::config::RopeScaling::LongRope { .. } => {
            bail!("cannot write Phi-3 longrope scaling as GGUF yet (it needs rope factor tensors)")
        }
    }
    Ok(m)
}

/// `tokenizer.ggml.*` and `tokenizer.chat_template`: `gpt2` for a byte-level BPE, `llama` for a
/// SentencePiece-style one (scores from the merge ranks, as llama.cpp merges by score); the list
/// padded with unused tokens to the model's `vocab_size`.
fn tokenizer_metadata(t: &ModelTokenizer, vocab_size: usize) -> Result<Vec<(String, Gguf)>> {
    let json: Value = serde_json::from_str(
        &t.inner
            .to_string(false)
            .map_err(|e| anyhow::anyhow!("cannot serialise the tokenizer: {e}"))?,
    )?;
    let model = &json["model"];
    if model["type"] != "BPE" {
        bail!(
            "cannot write a {} tokenizer as GGUF (only BPE)",
            model["type"]
        );
    }
    let pre = &json["pre_tokenizer"];
    let pre_text = pre.to_string();
    let kind = if pre_text.contains("\"ByteLevel\"") {
        "gpt2"
    } else if pre_text.contains("\"Metaspace\"") {
        "llama"
    } else {
        bail!("cannot write a BPE tokenizer with pre-tokenizer {pre_text} as GGUF")
    };
    let n = t.inner.get_vocab_size(true).max(vocab_size);
    let mut tokens: Vec<Option<String>> = vec![None; n];
    for (token, id) in t.inner.get_vocab(true) {
        if let Some(slot) = tokens.get_mut(id as usize) {
            *slot = Some(token);
        }
    }
    let merges: Vec<String> = model["merges"]
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|p| match p {
                    Value::String(s) => Some(s.clone()),
                    Value::Array(pair) => Some(
                        pair.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(" "),
                    ),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    let added: std::collections::HashMap<u32, bool> = t
        .inner
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(id, a)| (id, a.special))
        .collect();
    let mut types = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    for (id, token) in tokens.into_iter().enumerate() {
        let (name, kind_of) = match token {
            None => (format!("[PAD{id}]"), UNUSED),
            Some(tok) => {
                let ty = match added.get(&(id as u32)) {
                    Some(true) => CONTROL,
                    Some(false) => USER_DEFINED,
                    None if kind == "llama" && is_byte_token(&tok) => BYTE,
                    None => NORMAL,
                };
                (tok, ty)
            }
        };
        names.push(Gguf::String(name));
        types.push(Gguf::I32(kind_of));
    }
    let mut m = vec![
        (
            "tokenizer.ggml.model".to_string(),
            Gguf::String(kind.into()),
        ),
        ("tokenizer.ggml.tokens".into(), Gguf::Array(names)),
        ("tokenizer.ggml.token_type".into(), Gguf::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Gguf::Array(merges.iter().cloned().map(Gguf::String).collect()),
        ),
    ];
    if kind == "gpt2" {
        m.push((
            "tokenizer.ggml.pre".into(),
            Gguf::String(pre_type(pre).into()),
        ));
    } else {
        // A merged token scores minus the rank of the merge that makes it; others 0.
        let mut score = vec![0f32; n];
        for (rank, merge) in merges.iter().enumerate() {
            if let Some(id) = t.inner.token_to_id(&merge.replacen(' ', "", 1)) {
                let s = &mut score[id as usize];
                if *s == 0.0 {
                    *s = -(rank as f32) - 1.0;
                }
            }
        }
        m.push((
            "tokenizer.ggml.scores".into(),
            Gguf::Array(score.into_iter().map(Gguf::F32).collect()),
        ));
        let prepends = pre_text.contains("\"first\"") || pre_text.contains("\"always\"");
        m.push((
            "tokenizer.ggml.add_space_prefix".into(),
            Gguf::Bool(prepends),
        ));
    }
    for (key, token) in [
        ("tokenizer.ggml.bos_token_id", &t.bos_token),
        ("tokenizer.ggml.eos_token_id", &t.eos_token),
        ("tokenizer.ggml.padding_token_id", &t.pad_token),
    ] {
        if let Some(id) = token.as_deref().and_then(|s| t.inner.token_to_id(s)) {
            m.push((key.into(), Gguf::U32(id)));
        }
    }
    let adds = |id: Option<u32>, ids: &[u32]| id.is_some_and(|i| ids.contains(&i));
    m.push((
        "tokenizer.ggml.add_bos_token".into(),
        Gguf::Bool(adds(t.bos_id(), &t.specials.prefix)),
    ));
    m.push((
        "tokenizer.ggml.add_eos_token".into(),
        Gguf::Bool(adds(t.eos_id(), &t.specials.suffix)),
    ));
    if let Some(template) = &t.chat_template {
        m.push((
            "tokenizer.chat_template".into(),
            Gguf::String(template.clone()),
        ));
    }
    Ok(m)
}

/// `<0x0A>`-style byte tokens of a byte-fallback vocabulary.
fn is_byte_token(t: &str) -> bool {
    t.len() == 6 && t.starts_with("<0x") && t.ends_with('>')
}

/// llama.cpp's name (`tokenizer.ggml.pre`) for how a byte-level BPE tokenizer splits text before
/// its merges: by a known Split regex (Llama 3, Qwen2, Tekken, ...), or by GPT-2's regex, which a
/// lone ByteLevel pre-tokenizer with `use_regex` applies ("gpt-2"). Any other split has no name
/// llama.cpp knows: "default" is written, and llama.cpp will split such text in its own way.
fn pre_type(pre: &Value) -> &'static str {
    if let Some(name) = pre_text_regex(pre).and_then(pre_name) {
        return name;
    }
    if pre["type"] == "ByteLevel" && pre["use_regex"] != false {
        return "gpt-2";
    }
    tracing::warn!(
        "the tokenizer's pre-tokenizer has no llama.cpp name; the GGUF says `default`, and llama.cpp may split text into other tokens than tokenizer.json does"
    );
    "default"
}

/// The split regex of a `Sequence[Split, ByteLevel]` pre-tokenizer.
fn pre_text_regex(pre: &Value) -> Option<&str> {
    pre["pretokenizers"]
        .as_array()?
        .iter()
        .find(|p| p["type"] == "Split")?
        .get("pattern")?
        .get("Regex")?
        .as_str()
}
