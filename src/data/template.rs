//! Chat templates (Jinja, rendered with minijinja the way transformers renders them) and the
//! character spans of the rendered text that belong to assistant turns, which become the loss mask.

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
        Ok(Self {
            env,
            bos_token: bos_token.unwrap_or_default().to_string(),
            eos_token: eos_token.unwrap_or_default().to_string(),
        })
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

    /// Renders the conversation and finds each assistant turn's span: the text a turn adds after
    /// the generation prompt that precedes it (its content plus the template's end-of-turn marker).
    pub fn render_with_spans(&self, messages: &[Message]) -> Result<Rendered> {
        let text = self.render(messages, false)?;
        let mut trained = Vec::new();
        let mut cursor = 0;
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let prompt = self.render(&messages[..i], true)?;
            let upto = self.render(&messages[..=i], false)?;
            let span =
                if upto.starts_with(&prompt) && text.starts_with(&upto) && prompt.len() >= cursor {
                    prompt.len()..upto.len()
                } else {
                    // Templates that rewrite earlier turns (e.g. dropping reasoning) are not prefix-stable:
                    // fall back to the turn's content as it appears in the full text.
                    let start = text[cursor..]
                        .find(m.content.trim())
                        .map(|p| p + cursor)
                        .ok_or_else(|| {
                            anyhow!(
                                "assistant turn {} does not appear in the rendered template",
                                i + 1
                            )
                        })?;
                    let mut end = start + m.content.trim().len();
                    if !self.eos_token.is_empty() && text[end..].starts_with(&self.eos_token) {
                        end += self.eos_token.len();
                    }
                    start..end
                };
            cursor = span.end;
            trained.push(span);
        }
        Ok(Rendered { text, trained })
    }
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
