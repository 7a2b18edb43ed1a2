//! GGUF metadata read by key, with errors that name the key, and the transformers config.json the
//! `general.architecture`'s keys (`llama.*`, `qwen2.*`, `qwen3.*`) describe.

use anyhow::{bail, Context, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Map, Value as Json};
use std::collections::HashMap;

/// The metadata of one file.
pub struct Metadata<'a> {
    map: &'a HashMap<String, Value>,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a Content) -> Self {
        Self {
            map: &content.metadata,
        }
    }

    fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key)
    }

    /// An unsigned integer of any width.
    pub fn uint(&self, key: &str) -> Result<Option<u64>> {
        self.get(key).map(|v| as_uint(v, key)).transpose()
    }

    /// An unsigned integer the file must have.
    pub fn required_uint(&self, key: &str) -> Result<u64> {
        self.uint(key)?
            .with_context(|| format!("metadata key `{key}` is missing"))
    }

    pub fn float(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| as_float(v, key)).transpose()
    }

    pub fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key)
            .map(|v| match v {
                Value::Bool(b) => Ok(*b),
                other => bail!("metadata key `{key}` should be a bool, is {}", kind(other)),
            })
            .transpose()
    }

    pub fn string(&self, key: &str) -> Result<Option<&'a str>> {
        self.get(key).map(|v| as_str(v, key)).transpose()
    }

    fn array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        self.get(key)
            .map(|v| match v {
                Value::Array(items) => Ok(items.as_slice()),
                other => bail!(
                    "metadata key `{key}` should be an array, is {}",
                    kind(other)
                ),
            })
            .transpose()
    }

    pub fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        self.each(key, as_str)
    }

    pub fn floats(&self, key: &str) -> Result<Option<Vec<f32>>> {
        self.each(key, |v, k| as_float(v, k).map(|x| x as f32))
    }

    pub fn uints(&self, key: &str) -> Result<Option<Vec<u64>>> {
        self.each(key, as_uint)
    }

    /// Every item of array `key` through `convert` (given the item and its name, `key[i]`).
    fn each<T>(
        &self,
        key: &str,
        convert: impl Fn(&'a Value, &str) -> Result<T>,
    ) -> Result<Option<Vec<T>>> {
        let Some(items) = self.array(key)? else {
            return Ok(None);
        };
        items
            .iter()
            .enumerate()
            .map(|(i, v)| convert(v, &format!("{key}[{i}]")))
            .collect::<Result<_>>()
            .map(Some)
    }

    /// `general.architecture`, which prefixes the model's keys.
    pub fn architecture(&self) -> Result<&'a str> {
        self.string("general.architecture")?
            .context("metadata key `general.architecture` is missing")
    }

    /// The vocabulary size and the key it comes from: `<arch>.vocab_size`, else the number of
    /// `tokenizer.ggml.tokens`.
    pub fn vocab(&self) -> Result<(usize, String)> {
        let key = format!("{}.vocab_size", self.architecture()?);
        if let Some(n) = self.uint(&key)? {
            return Ok((n as usize, key));
        }
        let key = "tokenizer.ggml.tokens";
        match self.array(key)? {
            Some(tokens) => Ok((tokens.len(), format!("{key} (count)"))),
            None => bail!("metadata has neither `{key}` nor a vocab_size"),
        }
    }

    /// The head width and the key it comes from: `<arch>.attention.key_length`, else
    /// `<arch>.rope.dimension_count`; None when the file has neither (then it is hidden / heads).
    pub fn head_dim(&self) -> Result<Option<(u64, String)>> {
        let arch = self.architecture()?;
        for k in ["attention.key_length", "rope.dimension_count"] {
            let key = format!("{arch}.{k}");
            if let Some(d) = self.uint(&key)? {
                return Ok(Some((d, key)));
            }
        }
        Ok(None)
    }

    /// config.json as transformers would write it for this model. Which optional tensors exist
    /// decides the flags metadata does not carry (biases, tied embeddings).
    pub fn config_json(&self, content: &Content) -> Result<Json> {
        let arch = self.architecture()?;
        let Some(model_type) = super::architecture::model_type_of(arch) else {
            let names: Vec<&str> = super::architecture::ARCHITECTURES
                .iter()
                .map(|(a, _)| *a)
                .collect();
            bail!(
                "metadata key `general.architecture` is `{arch}`, which is not supported (supported: {})",
                names.join(", ")
            );
        };
        let key = |k: &str| format!("{arch}.{k}");
        let has = |name: &str| content.tensor_infos.contains_key(name);
        if has("rope_freqs.weight") {
            bail!("tensor `rope_freqs.weight` (per-frequency RoPE factors, Llama 3.1 scaling) is not supported");
        }
        for unsupported in ["attention.sliding_window", "rope.scaling.attn_factor"] {
            if self.get(&key(unsupported)).is_some() {
                bail!("metadata key `{}` is not supported", key(unsupported));
            }
        }
        let heads = self.required_uint(&key("attention.head_count"))?;
        let hidden = self.required_uint(&key("embedding_length"))?;
        // Without either key, head_dim is hidden / heads (config parsing checks divisibility).
        let head_dim = self.head_dim()?.map(|(d, _)| d);
        let mut c = Map::new();
        c.insert("model_type".into(), json!(model_type));
        c.insert("vocab_size".into(), json!(self.vocab()?.0));
        c.insert("hidden_size".into(), json!(hidden));
        c.insert(
            "intermediate_size".into(),
            json!(self.required_uint(&key("feed_forward_length"))?),
        );
        c.insert(
            "num_hidden_layers".into(),
            json!(self.required_uint(&key("block_count"))?),
        );
        c.insert("num_attention_heads".into(), json!(heads));
        c.insert(
            "num_key_value_heads".into(),
            json!(self.uint(&key("attention.head_count_kv"))?.unwrap_or(heads)),
        );
        if let Some(d) = head_dim {
            c.insert("head_dim".into(), json!(d));
        }
        c.insert("hidden_act".into(), json!("silu"));
        if let Some(n) = self.uint(&key("context_length"))? {
            c.insert("max_position_embeddings".into(), json!(n));
        }
        let eps = key("attention.layer_norm_rms_epsilon");
        c.insert(
            "rms_norm_eps".into(),
            json!(self
                .float(&eps)?
                .with_context(|| format!("metadata key `{eps}` is missing"))?),
        );
        if let Some(theta) = self.float(&key("rope.freq_base"))? {
            c.insert("rope_theta".into(), json!(theta));
        }
        c.insert("rope_scaling".into(), self.rope_scaling(arch)?);
        c.insert("tie_word_embeddings".into(), json!(!has("output.weight")));
        let attention_bias = has("blk.0.attn_q.bias");
        match model_type {
            "llama" => {
                c.insert("attention_bias".into(), json!(attention_bias));
                c.insert("mlp_bias".into(), json!(has("blk.0.ffn_up.bias")));
            }
            "qwen3" => {
                c.insert("attention_bias".into(), json!(attention_bias));
            }
            _ => {}
        }
        for (name, k) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = self.uint(k)? {
                c.insert(name.into(), json!(id));
            }
        }
        c.insert("torch_dtype".into(), json!("float32"));
        Ok(Json::Object(c))
    }

    /// `<arch>.rope.scaling.type` and `.factor` as config.json's `rope_scaling`.
    fn rope_scaling(&self, arch: &str) -> Result<Json> {
        let type_key = format!("{arch}.rope.scaling.type");
        let factor_key = format!("{arch}.rope.scaling.factor");
        match self.string(&type_key)? {
            None | Some("none") => Ok(Json::Null),
            Some("linear") => {
                let factor = self
                    .float(&factor_key)?
                    .with_context(|| format!("metadata key `{factor_key}` is missing"))?;
                Ok(json!({"rope_type": "linear", "factor": factor}))
            }
            Some(other) => bail!(
                "metadata key `{type_key}` is `{other}`, which is not supported (supported: none, linear)"
            ),
        }
    }
}

/// A float value of either width.
fn as_float(v: &Value, key: &str) -> Result<f64> {
    match v {
        Value::F32(x) => Ok(*x as f64),
        Value::F64(x) => Ok(*x),
        other => bail!("metadata key `{key}` should be a float, is {}", kind(other)),
    }
}

/// A string value.
fn as_str<'a>(v: &'a Value, key: &str) -> Result<&'a str> {
    match v {
        Value::String(s) => Ok(s.as_str()),
        other => bail!(
            "metadata key `{key}` should be a string, is {}",
            kind(other)
        ),
    }
}

/// An integer value of any width, if not negative.
fn as_uint(v: &Value, key: &str) -> Result<u64> {
    let n: i128 = match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        other => bail!(
            "metadata key `{key}` should be an integer, is {}",
            kind(other)
        ),
    };
    u64::try_from(n).with_context(|| format!("metadata key `{key}` is negative ({n})"))
}

/// A value's type, for messages (a value itself may be an array of 100,000 tokens).
fn kind(v: &Value) -> String {
    format!("{:?}", v.value_type()).to_lowercase()
}
