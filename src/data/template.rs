//! Chat templates (Jinja, rendered with minijinja the way transformers renders them) and the
//! character spans of the rendered text that belong to assistant turns, which become the loss mask.
//!
//! An assistant turn trains from the end of the generation prompt that precedes it (what the
//! template writes after `<|im_start|>assistant\n`, `<start_of_turn>model\n`, `<|assistant|>\n`,
//! so also the empty `<think>\n\n</think>\n\n` Qwen3 writes into the last turn) through its
//! end-of-turn token: the first special token of the tokenizer (or the EOS string) after the
//! answer. What a template writes after that token (a newline, Phi-3's closing EOS) is not
//! trained: generation stops at the end-of-turn token, so the model never produces it.

use aho_corasick::{AhoCorasick, MatchKind};
use anyhow::{anyhow, bail, Result};
use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;
use std::ops::Range;

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// The built-in templates a recipe can name instead of the model's own.
pub const BUILTIN: &[(&str, &str)] = &[
    ("chatml", crate::model::new::CHATML_TEMPLATE),
    (
        "llama3",
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
    ),
    (
        "mistral",
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{% if loop.first and system %}{{ '[INST] ' + system + '\n\n' + message['content'] + ' [/INST]' }}{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}",
    ),
    (
        "alpaca",
        "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% set loop_messages = messages[1:] %}{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n' }}{% set loop_messages = messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}",
    ),
];

/// A compiled chat template with the special tokens it may reference.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
    /// The strings that end an assistant turn: the EOS string, and with
    /// [`ChatTemplate::ending_turns_at`] the tokenizer's special tokens.
    turn_ends: Option<AhoCorasick>,
}

/// A rendered conversation and the byte ranges of its assistant turns.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub text: String,
    pub trained: Vec<Range<usize>>,
}

impl ChatTemplate {
    /// Compiles `source` with the settings and helpers transformers gives its Jinja environment.
    pub fn new(source: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_function("strftime_now", |format: String| -> String {
            strftime_now(&format)
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| anyhow!("the chat template does not compile: {e}"))?;
        let eos_token = eos_token.unwrap_or_default().to_string();
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            turn_ends: turn_ends_matcher(std::iter::once(eos_token.clone()))?,
            eos_token,
        })
    }

    /// Ends assistant turns at the first of `tokens` (the tokenizer's special tokens, e.g.
    /// `<end_of_turn>`, `<|end|>`, `<|im_end|>`) or the EOS string.
    pub fn ending_turns_at(mut self, tokens: impl IntoIterator<Item = String>) -> Result<Self> {
        let all = tokens
            .into_iter()
            .chain(std::iter::once(self.eos_token.clone()));
        self.turn_ends = turn_ends_matcher(all)?;
        Ok(self)
    }

    /// A built-in template by name.
    pub fn builtin(name: &str, bos_token: Option<&str>, eos_token: Option<&str>) -> Result<Self> {
        match BUILTIN.iter().find(|(n, _)| *n == name) {
            Some((_, source)) => Self::new(source, bos_token, eos_token),
            None => bail!(
                "unknown template `{name}`; use \"model\" (the model's own) or one of: {}",
                BUILTIN
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The template's text for `messages`.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| anyhow!("{e}"))?;
        tmpl.render(minijinja::context! {
            messages => Value::from(minijinja::value::Serde(messages)),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        })
        .map_err(|e| anyhow!("rendering the chat template failed: {e}"))
    }

    /// Renders the conversation and finds each assistant turn's span: from the end of the
    /// generation prompt that precedes it through its end-of-turn token (see the module comment).
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered> {
        let text = self.render(messages, false)?;
        let mut trained = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = self.render(&messages[..i], true)?;
            let span = if text.starts_with(&prompt) && prompt.len() >= cursor {
                let start = prompt.len();
                // The turn is at most as long as it is when it ends the conversation (Qwen3's
                // earlier turns are shorter: their reasoning block is dropped).
                let upto = self.render(&messages[..=i], false)?;
                let limit = match upto.strip_prefix(&prompt) {
                    Some(turn) => (start + turn.len()).min(text.len()),
                    None => text.len(),
                };
                let end = match self.turn_end(&text, start, limit) {
                    Some(found) => found.end,
                    None if text.starts_with(&upto) => upto.len(),
                    None => content_span(&text, start, m, i)?.end,
                };
                start..end
            } else {
                // Templates whose generation prompt differs from how the history renders (e.g. a
                // prompt that opens a reasoning block the history drops): the turn's content as
                // it appears in the full text, and the end-of-turn token right after it.
                let content = content_span(&text, cursor, m, i)?;
                let end = self
                    .turn_end(&text, content.end, text.len())
                    .filter(|found| found.start == content.end)
                    .map_or(content.end, |found| found.end);
                content.start..end
            };
            cursor = span.end;
            trained.push(span);
        }
        Ok(Rendered { text, trained })
    }

    /// The first end-of-turn string in `text[from..limit]`, as a range of `text`.
    fn turn_end(&self, text: &str, from: usize, limit: usize) -> Option<Range<usize>> {
        let found = self
            .turn_ends
            .as_ref()?
            .find(&text.as_bytes()[from..limit])?;
        Some(from + found.start()..from + found.end())
    }
}

/// The byte range of assistant message `i`'s (trimmed) content in `text`, searched from `from`.
fn content_span(text: &str, from: usize, m: &Message, i: usize) -> Result<Range<usize>> {
    let content = m.content.trim();
    let start = text[from..]
        .find(content)
        .map(|p| p + from)
        .ok_or_else(|| {
            anyhow!(
                "assistant turn {} does not appear in the rendered template",
                i + 1
            )
        })?;
    Ok(start..start + content.len())
}

/// A matcher of the non-empty `strings`, the leftmost (longest) first; None when there are none.
fn turn_ends_matcher(strings: impl IntoIterator<Item = String>) -> Result<Option<AhoCorasick>> {
    let mut strings: Vec<String> = strings.into_iter().filter(|s| !s.is_empty()).collect();
    strings.sort_unstable();
    strings.dedup();
    if strings.is_empty() {
        return Ok(None);
    }
    AhoCorasick::builder()
        .match_kind(MatchKind::LeftmostLongest)
        .build(&strings)
        .map(Some)
        .map_err(|e| anyhow!("cannot search for the end-of-turn tokens: {e}"))
}

/// The current UTC date and time formatted with strftime codes (Llama 3 templates ask for it).
fn strftime_now(format: &str) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    match write!(out, "{}", chrono::Utc::now().format(format)) {
        Ok(()) => out,
        Err(_) => format.to_string(),
    }
}
