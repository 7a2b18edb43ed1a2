//! Samples → token ids and labels. Every format becomes one text with the byte spans that train;
//! the text is tokenized once and a token trains when it starts inside a trained span.

use anyhow::{anyhow, bail, Result};
use std::ops::Range;

use super::format::Sample;
use super::template::ChatTemplate;
use super::{Example, IGNORE_INDEX};
use crate::model::ModelTokenizer;

/// A sample as the model sees it: its text, the trained spans, and the tokens.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub text: String,
    pub trained: Vec<Range<usize>>,
    pub example: Example,
}

/// Renders and tokenizes samples for one model.
pub struct Encoder<'a> {
    tokenizer: &'a ModelTokenizer,
    template: Option<ChatTemplate>,
    template_name: String,
    train_on_inputs: bool,
}

impl<'a> Encoder<'a> {
    /// `template` is `model` (the tokenizer's chat template) or a built-in name.
    pub fn new(
        tokenizer: &'a ModelTokenizer,
        template: &str,
        train_on_inputs: bool,
    ) -> Result<Self> {
        let (bos, eos) = (
            tokenizer.bos_token.as_deref(),
            tokenizer.eos_token.as_deref(),
        );
        let template_obj = match template {
            "model" => tokenizer
                .chat_template
                .as_deref()
                .map(|t| ChatTemplate::new(t, bos, eos))
                .transpose()?,
            name => Some(ChatTemplate::builtin(name, bos, eos)?),
        };
        Ok(Self {
            tokenizer,
            template: template_obj,
            template_name: template.to_string(),
            train_on_inputs,
        })
    }

    /// The sample's text, trained spans and tokens.
    pub fn encode(&self, sample: &Sample) -> Result<Encoded> {
        let eos = self.tokenizer.eos_token.clone().unwrap_or_default();
        let (text, trained, append_eos) = match sample {
            Sample::Text(t) => (t.clone(), std::iter::once(0..t.len()).collect(), true),
            Sample::Completion { prompt, completion } => {
                let text = format!("{prompt}{completion}");
                (
                    text,
                    std::iter::once(prompt.len()..prompt.len() + completion.len()).collect(),
                    true,
                )
            }
            Sample::Chat(messages) => {
                let Some(template) = &self.template else {
                    bail!(
                        "the model has no chat template (tokenizer_config.json has no `chat_template`); set [data] template to one of: {}",
                        super::template::BUILTIN.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
                    );
                };
                let r = template
                    .render_with_spans(messages)
                    .map_err(|e| anyhow!("template `{}`: {e:#}", self.template_name))?;
                (r.text, r.trained, false)
            }
        };
        let encoding = self
            .tokenizer
            .inner
            .encode(text.as_str(), false)
            .map_err(|e| anyhow!("tokenization failed: {e}"))?;
        let mut input_ids = Vec::with_capacity(encoding.len() + 2);
        let mut labels = Vec::with_capacity(encoding.len() + 2);
        let prepend_bos = self.tokenizer.add_bos_token
            && !matches!(sample, Sample::Chat(_))
            && self.tokenizer.bos_id().is_some();
        if prepend_bos {
            input_ids.push(self.tokenizer.bos_id().unwrap_or_default());
            labels.push(IGNORE_INDEX);
        }
        for (&id, &(start, _)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
            let trains = self.train_on_inputs || trained.iter().any(|s| s.contains(&start));
            input_ids.push(id);
            labels.push(if trains { id as i64 } else { IGNORE_INDEX });
        }
        let mut trained = trained;
        let mut text = text;
        if append_eos {
            if let Some(id) = self.tokenizer.eos_id() {
                input_ids.push(id);
                labels.push(id as i64);
                trained.push(text.len()..text.len() + eos.len());
                text.push_str(&eos);
            }
        }
        let segments = vec![input_ids.len()];
        Ok(Encoded {
            text,
            trained,
            example: Example {
                input_ids,
                labels,
                segments,
            },
        })
    }
}
