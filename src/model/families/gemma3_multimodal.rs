//! Gemma 3 multimodal (`gemma3`, Gemma3ForConditionalGeneration: 4B, 12B, 27B): the Gemma 3 text
//! decoder (see [`super::gemma3`]) read from config.json's `text_config`, Gemma3TextConfig's
//! defaults filling what it leaves out. The decoder is the language model at
//! `model.language_model`, which transformers (4.5x and 5.x) stores as `language_model.model.*`;
//! either spelling loads. Unlike Gemma3ForCausalLM it never soft-caps its logits. The vision tower
//! and projector stay on disk: Feinschliff fine-tunes the language model on text, and a merged
//! export copies them unchanged.

use anyhow::{bail, Context, Result};
use serde_json::{Map, Value};

use super::family::Family;
use crate::model::config::ModelConfig;
use crate::model::text_model::TextModel;

/// Where the language model sits: transformers' module path, and Gemma3ForConditionalGeneration's
/// `_checkpoint_conversion_mapping` reversed (the prefixes its files use).
const LANGUAGE_MODEL: TextModel = TextModel {
    decoder: "model.language_model",
    stored_as: &[
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ],
};

/// Top-level fields of config.json that the text model takes when `text_config` lacks them.
const INHERITED: [&str; 3] = ["torch_dtype", "dtype", "tie_word_embeddings"];

pub struct Gemma3Multimodal;

impl Family for Gemma3Multimodal {
    fn model_type(&self) -> &'static str {
        "gemma3"
    }
    fn architecture(&self) -> &'static str {
        "Gemma3ForConditionalGeneration"
    }
    fn parse(&self, raw: &Value) -> Result<ModelConfig> {
        let mut text = match raw.get("text_config") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(text)) => text.clone(),
            Some(other) => bail!(
                "field `text_config`: expected the text model's config (an object), found {other}"
            ),
        };
        for key in INHERITED {
            if let Some(value) = raw.get(key) {
                text.entry(key).or_insert_with(|| value.clone());
            }
        }
        let mut c = super::gemma3::Gemma3
            .parse(&Value::Object(text))
            .context("in field `text_config`")?;
        c.model_type = self.model_type().to_string();
        c.text_model = LANGUAGE_MODEL;
        // Gemma3ForConditionalGeneration (transformers 4.57 and 5.24) never caps its logits, whatever
        // `final_logit_softcapping` says; only Gemma3ForCausalLM does.
        c.final_logit_softcapping = None;
        Ok(c)
    }
    /// None: `model new` writes no vision tower, so no complete checkpoint of this family.
    fn new_config_fields(&self, _layers: usize) -> Option<Value> {
        None
    }
    fn ties_embeddings(&self) -> bool {
        true
    }
}
