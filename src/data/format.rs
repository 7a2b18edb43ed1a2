//! Rows of a DataFrame → [`Sample`]s, for each format and with the recipe's column mapping.
//! Rows that cannot train anything (empty or null text) are dropped and counted; rows that are
//! wrong (unknown roles, wrong types, missing columns) are errors naming the file (or query) and row.

use anyhow::{anyhow, bail, Result};
use polars::prelude::*;
use std::collections::BTreeMap;

use super::template::Message;
use crate::recipe::{Columns, DataFormat};

/// One training sample before rendering.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Sample {
    /// Raw text: every token trains.
    Text(String),
    /// Prompt and completion joined as they are: the completion trains.
    Completion { prompt: String, completion: String },
    /// A conversation rendered with the chat template: assistant turns train.
    Chat(Vec<Message>),
}

/// Why rows were dropped, with counts.
pub type Drops = BTreeMap<String, usize>;

/// How to read samples out of frames.
pub struct RowMapping<'a> {
    pub format: DataFormat,
    pub columns: &'a Columns,
    /// Role names in the data → system/user/assistant.
    pub roles: &'a BTreeMap<String, String>,
}

impl RowMapping<'_> {
    /// The samples of one frame read from `origin` (a file, or an SQL connection), each with its
    /// row (0-based) in the frame.
    pub fn samples(
        &self,
        df: &DataFrame,
        origin: &str,
        drops: &mut Drops,
    ) -> Result<Vec<(usize, Sample)>> {
        let c = self.columns;
        let mut out = Vec::with_capacity(df.height());
        let mut drop = |reason: String| *drops.entry(reason).or_default() += 1;
        match self.format {
            DataFormat::Text => {
                for (row, text) in text_column(df, &c.text, origin)?.into_iter().enumerate() {
                    match text.filter(|t| !t.trim().is_empty()) {
                        Some(t) => out.push((row, Sample::Text(t))),
                        None => drop(format!("empty `{}`", c.text)),
                    }
                }
            }
            DataFormat::Completion => {
                let prompts = text_column(df, &c.prompt, origin)?;
                let completions = text_column(df, &c.completion, origin)?;
                for (row, (prompt, completion)) in prompts.into_iter().zip(completions).enumerate()
                {
                    match completion.filter(|t| !t.trim().is_empty()) {
                        Some(completion) => out.push((
                            row,
                            Sample::Completion {
                                prompt: prompt.unwrap_or_default(),
                                completion,
                            },
                        )),
                        None => drop(format!("empty `{}`", c.completion)),
                    }
                }
            }
            DataFormat::Instruction => {
                let instructions = text_column(df, &c.instruction, origin)?;
                let outputs = text_column(df, &c.output, origin)?;
                let inputs = optional_text_column(df, &c.input, origin)?;
                let systems = optional_text_column(df, &c.system, origin)?;
                for (i, (instruction, output)) in instructions.into_iter().zip(outputs).enumerate()
                {
                    let (Some(instruction), Some(output)) = (
                        instruction.filter(|t| !t.trim().is_empty()),
                        output.filter(|t| !t.trim().is_empty()),
                    ) else {
                        drop(format!("empty `{}` or `{}`", c.instruction, c.output));
                        continue;
                    };
                    let mut messages = Vec::with_capacity(3);
                    if let Some(system) = systems
                        .as_ref()
                        .and_then(|s| s[i].clone())
                        .filter(|s| !s.trim().is_empty())
                    {
                        messages.push(Message {
                            role: "system".into(),
                            content: system,
                        });
                    }
                    let user = match inputs
                        .as_ref()
                        .and_then(|v| v[i].clone())
                        .filter(|s| !s.trim().is_empty())
                    {
                        Some(input) => format!("{instruction}\n\n{input}"),
                        None => instruction,
                    };
                    messages.push(Message {
                        role: "user".into(),
                        content: user,
                    });
                    messages.push(Message {
                        role: "assistant".into(),
                        content: output,
                    });
                    out.push((i, Sample::Chat(messages)));
                }
            }
            DataFormat::Chat => {
                for (i, messages) in self.conversations(df, origin)?.into_iter().enumerate() {
                    let Some(messages) = messages else {
                        drop(format!("null `{}`", c.messages));
                        continue;
                    };
                    let messages = self.map_roles(messages, origin, i)?;
                    if messages.iter().any(|m| m.content.trim().is_empty()) {
                        drop("a message with empty content".into());
                    } else if !messages.iter().any(|m| m.role == "assistant") {
                        drop("no assistant message".into());
                    } else {
                        out.push((i, Sample::Chat(messages)));
                    }
                }
            }
        }
        Ok(out)
    }

    /// Maps the data's role names to system/user/assistant; an unknown role is an error.
    fn map_roles(&self, messages: Vec<Message>, origin: &str, row: usize) -> Result<Vec<Message>> {
        messages
            .into_iter()
            .map(|m| {
                let role = match self.roles.get(&m.role) {
                    Some(r) => r.clone(),
                    None if ["system", "user", "assistant"].contains(&m.role.as_str()) => m.role,
                    None => bail!(
                        "{} row {}: unknown role `{}`; map it in the recipe, e.g. [data.roles] {} = \"assistant\" (allowed: system, user, assistant)",
                        origin,
                        row + 1,
                        m.role,
                        m.role
                    ),
                };
                Ok(Message { role, content: m.content })
            })
            .collect()
    }

    /// The message lists of the messages column: a list of structs, or JSON text.
    fn conversations(&self, df: &DataFrame, origin: &str) -> Result<Vec<Option<Vec<Message>>>> {
        let c = self.columns;
        let col = column(df, &c.messages, origin)?;
        match col.dtype() {
            DataType::List(inner) => {
                let DataType::Struct(fields) = inner.as_ref() else {
                    bail!(
                        "{}: column `{}` must hold lists of messages (objects), found {}",
                        origin,
                        c.messages,
                        col.dtype()
                    );
                };
                let names: Vec<String> = fields.iter().map(|f| f.name().to_string()).collect();
                for want in [&c.role, &c.content] {
                    if !names.contains(want) {
                        bail!(
                            "{}: messages in column `{}` have fields [{}] but no `{want}`; set [data.columns] role = \"...\" and content = \"...\" (ShareGPT: role = \"from\", content = \"value\")",
                            origin,
                            c.messages,
                            names.join(", ")
                        );
                    }
                }
                let list = col.list()?;
                let mut out = Vec::with_capacity(list.len());
                for row in 0..list.len() {
                    let Some(series) = list.get_as_series(row) else {
                        out.push(None);
                        continue;
                    };
                    let s = series.struct_()?;
                    let roles = s.field_by_name(&c.role)?;
                    let contents = s.field_by_name(&c.content)?;
                    let (roles, contents) = (
                        roles.str().map_err(|_| {
                            anyhow!(
                                "{} row {}: message `{}` must be text",
                                origin,
                                row + 1,
                                c.role
                            )
                        })?,
                        contents.str().map_err(|_| {
                            anyhow!(
                                "{} row {}: message `{}` must be text",
                                origin,
                                row + 1,
                                c.content
                            )
                        })?,
                    );
                    let messages = roles
                        .iter()
                        .zip(contents.iter())
                        .map(|(r, t)| Message {
                            role: r.unwrap_or_default().to_string(),
                            content: t.unwrap_or_default().to_string(),
                        })
                        .collect();
                    out.push(Some(messages));
                }
                Ok(out)
            }
            DataType::String => text_column(df, &c.messages, origin)?
                .into_iter()
                .enumerate()
                .map(|(row, text)| match text {
                    None => Ok(None),
                    Some(t) => parse_json_messages(&t, &c.role, &c.content)
                        .map(Some)
                        .map_err(|e| {
                            anyhow!("{} row {}: column `{}`: {e}", origin, row + 1, c.messages)
                        }),
                })
                .collect(),
            other => bail!(
                "{}: column `{}` must hold a list of messages, found {other}",
                origin,
                c.messages
            ),
        }
    }
}

/// Messages from a JSON string (csv files carry them so).
fn parse_json_messages(text: &str, role: &str, content: &str) -> Result<Vec<Message>> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| anyhow!("not a JSON list of messages: {e}"))?;
    let items = value
        .as_array()
        .ok_or_else(|| anyhow!("not a JSON list of messages"))?;
    items
        .iter()
        .map(|m| {
            let field = |k: &str| {
                m.get(k)
                    .and_then(|v| v.as_str())
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("a message has no text field `{k}`"))
            };
            Ok(Message {
                role: field(role)?,
                content: field(content)?,
            })
        })
        .collect()
}

/// The column `name`, or an error naming the origin and the nearest existing column.
fn column<'a>(df: &'a DataFrame, name: &str, origin: &str) -> Result<&'a Column> {
    df.column(name).map_err(|_| {
        let names: Vec<String> = df
            .get_column_names()
            .iter()
            .map(|n| n.to_string())
            .collect();
        let nearest = names
            .iter()
            .min_by_key(|n| strsim::levenshtein(n, name))
            .map(|n| format!("; did you mean `{n}`? (map columns in [data.columns])"))
            .unwrap_or_default();
        anyhow!(
            "{} has no column `{name}` (columns: {}){nearest}",
            origin,
            names.join(", ")
        )
    })
}

/// A text column's values (null stays None); a non-text column is an error.
fn text_column(df: &DataFrame, name: &str, origin: &str) -> Result<Vec<Option<String>>> {
    let col = column(df, name, origin)?;
    if col.dtype() == &DataType::Null {
        return Ok(vec![None; col.len()]);
    }
    let s = col.str().map_err(|_| {
        anyhow!(
            "{}: column `{name}` must hold text, found {}",
            origin,
            col.dtype()
        )
    })?;
    Ok(s.iter().map(|v| v.map(str::to_string)).collect())
}

/// Like [`text_column`], but a missing column is None.
fn optional_text_column(
    df: &DataFrame,
    name: &str,
    origin: &str,
) -> Result<Option<Vec<Option<String>>>> {
    if df.column(name).is_err() {
        return Ok(None);
    }
    text_column(df, name, origin).map(Some)
}
