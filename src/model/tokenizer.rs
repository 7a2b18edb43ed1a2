//! The model's tokenizer (`tokenizer.json`) with what `tokenizer_config.json` adds: special tokens,
//! BOS/EOS policy and the chat template.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::Path;

/// A Hugging Face tokenizer plus the settings transformers reads from tokenizer_config.json.
pub struct ModelTokenizer {
    pub inner: tokenizers::Tokenizer,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    /// Whether the tokenizer is expected to start every sequence with BOS.
    pub add_bos_token: bool,
    pub chat_template: Option<String>,
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
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow!("cannot load {}: {e}", path.display()))?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            let text = std::fs::read_to_string(&config_path)?;
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
        let chat_template =
            chat_template.or_else(|| std::fs::read_to_string(dir.join("chat_template.jinja")).ok());
        Ok(Self {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            add_bos_token: config
                .get("add_bos_token")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            chat_template,
            inner,
        })
    }

    /// Token ids of `text` without special tokens added.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        Ok(enc.get_ids().to_vec())
    }

    /// The text of token ids (special tokens kept).
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| anyhow!("decoding failed: {e}"))
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
