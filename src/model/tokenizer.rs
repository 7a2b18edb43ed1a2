//! The model's tokenizer (`tokenizer.json`) with what `tokenizer_config.json` adds: special tokens
//! and the chat template.
//!
//! Special tokens follow transformers 5: `tokenizer(text)` (add_special_tokens=True) adds what
//! tokenizer.json's post-processor adds (Llama 3's TemplateProcessing, Llama 2's and Mistral's
//! `<s> $A`); transformers 5 drops `add_bos_token`/`add_eos_token` from tokenizer_config.json
//! when tokenizer.json exists, so they decide nothing here either (transformers 4's
//! LlamaTokenizerFast rebuilt its post-processor from them; the two agree on the published
//! Llama 2 and Mistral files).

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// A Hugging Face tokenizer plus the settings transformers reads from tokenizer_config.json.
pub struct ModelTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// What transformers' `add_special_tokens=True` puts before and after a text.
    pub specials: SpecialTokens,
    /// `add_bos_token` as tokenizer_config.json states it (ignored, see the module comment).
    pub config_add_bos_token: Option<bool>,
    pub chat_template: Option<String>,
    /// The file the chat template was read from (tokenizer_config.json or chat_template.jinja),
    /// for messages.
    pub chat_template_file: Option<PathBuf>,
}

/// The special tokens tokenizer.json's post-processor adds around a single text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpecialTokens {
    pub prefix: Vec<u32>,
    pub suffix: Vec<u32>,
    /// The post-processor's kind, e.g. `Sequence[ByteLevel, TemplateProcessing]`, or `none`.
    pub post_processor: String,
}

impl SpecialTokens {
    /// Finds them by tokenizing a probe text with and without special tokens.
    fn of(inner: &tokenizers::Tokenizer) -> Result<Self> {
        let ids =
            |add: bool| -> Result<Vec<u32>> { Ok(encoding(inner, "a", add)?.get_ids().to_vec()) };
        let (plain, full) = (ids(false)?, ids(true)?);
        let at = (0..=full.len().saturating_sub(plain.len()))
            .find(|&k| full[k..].starts_with(&plain))
            .ok_or_else(|| {
                anyhow!(
                    "tokenizer.json's post-processor changes the text's own tokens: unsupported"
                )
            })?;
        Ok(Self {
            prefix: full[..at].to_vec(),
            suffix: full[at + plain.len()..].to_vec(),
            post_processor: inner
                .get_post_processor()
                .and_then(|p| serde_json::to_value(p).ok())
                .map_or_else(|| "none".into(), |v| kind(&v)),
        })
    }
}

/// `text` encoded by the tokenizers library; a panic inside it is an error (some invalid
/// tokenizer.json settings, e.g. a `Prepend` normalizer of an empty string, panic on every text).
fn encoding(
    inner: &tokenizers::Tokenizer,
    text: &str,
    add_special_tokens: bool,
) -> Result<tokenizers::Encoding> {
    crate::failure::caught(|| inner.encode(text, add_special_tokens))
        .context("tokenization failed: tokenizer.json may hold invalid settings")?
        .map_err(|e| anyhow!("tokenization failed: {e}"))
}

/// A post-processor's type, with the parts of a `Sequence`.
fn kind(v: &Value) -> String {
    let name = v.get("type").and_then(Value::as_str).unwrap_or("unknown");
    match v.get("processors").and_then(Value::as_array) {
        Some(parts) => format!(
            "{name}[{}]",
            parts.iter().map(kind).collect::<Vec<_>>().join(", ")
        ),
        None => name.to_string(),
    }
}

impl ModelTokenizer {
    /// Loads tokenizer.json and (optionally) tokenizer_config.json from a checkpoint folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            bail!(
                "{} is missing: Feinschliff needs the fast tokenizer file of the model",
                path.display()
            );
        }
        let text = crate::fsutil::read_text(&path, "tokenizer")?;
        // tokenizers 0.23 panics on a JSON syntax error inside `decoder` (check the syntax first)
        // and on some invalid settings, e.g. a BPE `continuing_subword_prefix` longer than tokens.
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        let inner: tokenizers::Tokenizer = crate::failure::caught(|| text.parse())
            .with_context(|| format!("cannot load {}", path.display()))?
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = crate::fsutil::read_text(&config_path, "tokenizer config")?;
            serde_json::from_str(&text)
                .with_context(|| format!("{} is not valid JSON", config_path.display()))?
        } else {
            Value::Null
        };
        let token = |key: &str| -> Option<String> {
            match config.get(key) {
                Some(Value::String(s)) => Some(s.clone()),
                Some(Value::Object(o)) => {
                    o.get("content").and_then(Value::as_str).map(str::to_string)
                }
                _ => None,
            }
        };
        let chat_template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take the default one.
            Some(Value::Array(items)) => items
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_string),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        let (chat_template, chat_template_file) = match chat_template {
            Some(t) => (Some(t), Some(config_path)),
            None => match std::fs::read_to_string(&jinja) {
                Ok(t) => (Some(t), Some(jinja)),
                Err(_) => (None, None),
            },
        };
        let mut tokenizer = Self::from_parts(
            inner,
            [token("bos_token"), token("eos_token"), token("pad_token")],
            chat_template,
            chat_template_file,
        )
        .with_context(|| format!("special tokens of {}", path.display()))?;
        tokenizer.config_add_bos_token = config.get("add_bos_token").and_then(Value::as_bool);
        Ok(tokenizer)
    }

    /// A tokenizer built elsewhere (e.g. from GGUF metadata) with its BOS, EOS and pad tokens and
    /// chat template (and the file that came from).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        [bos_token, eos_token, pad_token]: [Option<String>; 3],
        chat_template: Option<String>,
        chat_template_file: Option<PathBuf>,
    ) -> Result<Self> {
        Ok(Self {
            bos_token,
            eos_token,
            pad_token,
            specials: SpecialTokens::of(&inner)?,
            config_add_bos_token: None,
            chat_template,
            chat_template_file,
            inner,
        })
    }

    /// Token ids of `text` without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(encoding(&self.inner, text, false)?.get_ids().to_vec())
    }

    /// The tokenizers library's encoding of `text` (ids and offsets), without special tokens.
    pub fn encoding(&self, text: &str) -> Result<tokenizers::Encoding> {
        encoding(&self.inner, text, false)
    }

    /// Token ids of `text` with the special tokens transformers' `tokenizer(text)` adds.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>> {
        let s = &self.specials;
        Ok([&s.prefix[..], &self.encode(text)?, &s.suffix[..]].concat())
    }

    /// The text of token ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        // tokenizers 0.23's BPEDecoder underflows on no tokens (a panic with overflow checks).
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// The text of token ids without special tokens (`skip_special_tokens=True`).
    pub fn decode_skipping_special(&self, ids: &[u32]) -> Result<String> {
        if ids.is_empty() {
            return Ok(String::new());
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| anyhow!("decoding failed: {e}"))
    }

    /// The texts of the added tokens marked special (`<|im_end|>`, `<end_of_turn>`, ...).
    pub fn special_tokens(&self) -> Vec<String> {
        self.inner
            .get_added_tokens_decoder()
            .into_values()
            .filter(|t| t.special)
            .map(|t| t.content)
            .collect()
    }

    fn id_of(&self, token: &Option<String>) -> Option<u32> {
        token.as_deref().and_then(|t| self.inner.token_to_id(t))
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.id_of(&self.bos_token)
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.id_of(&self.eos_token)
    }

    /// The id used to pad batches: the pad token, else EOS, else 0 (padding is always masked out).
    pub fn pad_id(&self) -> u32 {
        self.id_of(&self.pad_token)
            .or_else(|| self.eos_id())
            .unwrap_or(0)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
