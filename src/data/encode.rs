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
    /// The template in messages: `template `chatml`` or the file the model's template is in.
    template_label: String,
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
        let template_label = match (template, &tokenizer.chat_template_file) {
            ("model", Some(file)) => format!("the chat template in {}", file.display()),
            (name, _) => format!("template `{name}`"),
        };
        let template_obj = match template {
            "model" => tokenizer
                .chat_template
                .as_deref()
                .map(|t| ChatTemplate::new(t, bos, eos))
                .transpose()
                .map_err(|e| anyhow!("{template_label}: {e:#}"))?,
            name => Some(ChatTemplate::builtin(name, bos, eos)?),
        }
        .map(|t| t.ending_turns_at(tokenizer.special_tokens()))
        .transpose()?;
        Ok(Self {
            tokenizer,
            template: template_obj,
            template_label,
            train_on_inputs,
        })
    }

    /// The sample's text, trained spans and tokens. Text and completion samples are tokenized as
    /// transformers' `tokenizer(text)` does (with the special tokens tokenizer.json's
    /// post-processor adds, e.g. BOS) and end with EOS (once, also when the tokenizer adds it);
    /// chats and instructions are their rendered template encoded without special tokens, as
    /// `apply_chat_template(tokenize=True)` does, so a template that writes BOS gives one BOS.
    pub fn encode(&self, sample: &Sample) -> Result<Encoded> {
        let (mut text, mut trained, plain_text) = match sample {
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
                    .map_err(|e| anyhow!("{}: {e:#}", self.template_label))?;
                (r.text, r.trained, false)
            }
        };
        let encoding = self.tokenizer.encoding(&text)?;
        let mut input_ids = Vec::with_capacity(encoding.len() + 3);
        let mut labels = Vec::with_capacity(encoding.len() + 3);
        for (&id, &(start, _)) in encoding.get_ids().iter().zip(encoding.get_offsets()) {
            let trains = self.train_on_inputs || trained.iter().any(|s| s.contains(&start));
            input_ids.push(id);
            labels.push(if trains { id as i64 } else { IGNORE_INDEX });
        }
        if plain_text {
            // What the tokenizer adds: the prefix (BOS) is never a target, the suffix (EOS) ends
            // the trained text. The shown text gets their strings.
            let (prefix, suffix) = text_specials(self.tokenizer);
            let prefix_text = self.tokenizer.decode(prefix)?;
            let suffix_text = self.tokenizer.decode(&suffix)?;
            input_ids.splice(0..0, prefix.iter().copied());
            labels.splice(0..0, prefix.iter().map(|_| IGNORE_INDEX));
            input_ids.extend(&suffix);
            labels.extend(suffix.iter().map(|&id| id as i64));
            for span in &mut trained {
                *span = span.start + prefix_text.len()..span.end + prefix_text.len();
            }
            text.insert_str(0, &prefix_text);
            if !suffix_text.is_empty() {
                trained.push(text.len()..text.len() + suffix_text.len());
                text.push_str(&suffix_text);
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

/// The ids around a text or completion sample's tokens: before them what the tokenizer adds (e.g.
/// BOS), after them what it adds and EOS, once.
pub fn text_specials(tokenizer: &ModelTokenizer) -> (&[u32], Vec<u32>) {
    let mut suffix = tokenizer.specials.suffix.clone();
    if let Some(eos) = tokenizer.eos_id() {
        if suffix.last() != Some(&eos) {
            suffix.push(eos);
        }
    }
    (&tokenizer.specials.prefix, suffix)
}
