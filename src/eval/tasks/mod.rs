//! Task kinds. Each file turns a task's documents into scoring requests and the results into
//! metrics and per-sample records, with lm-evaluation-harness's definitions.

pub mod documents;
pub mod generate;
pub mod multiple_choice;
pub mod perplexity;

use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::SerWriter as _;
use rand::seq::IndexedRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::collections::BTreeMap;

use super::suite::{DatasetRef, Suite, TaskConfig};
use crate::data::template::{ChatTemplate, Message};
use crate::model::ModelTokenizer;

/// One row of a task's dataset, as JSON.
pub type Doc = Value;

/// What one task produced.
#[derive(Debug, Clone)]
pub struct TaskResult {
    pub name: String,
    /// metric → (value, standard error if defined).
    pub metrics: BTreeMap<String, (f64, Option<f64>)>,
    /// Per-sample records for samples_<task>.jsonl.
    pub samples: Vec<Value>,
    pub n_original: usize,
    pub n_effective: usize,
}

impl TaskResult {
    /// A result whose metrics are per-document means with their standard errors; only the
    /// metrics the task reports are kept.
    pub fn from_means(
        task: &TaskConfig,
        per_doc: Vec<(String, Vec<f64>)>,
        samples: Vec<Value>,
        n_original: usize,
        n_effective: usize,
    ) -> Self {
        let wanted = task.metric_names();
        let metrics = per_doc
            .into_iter()
            .filter(|(name, _)| wanted.contains(name))
            .map(|(name, values)| {
                let stats = (
                    super::metrics::mean(&values),
                    Some(super::metrics::mean_stderr(&values)),
                );
                (name, stats)
            })
            .collect();
        Self {
            name: task.name.clone(),
            metrics,
            samples,
            n_original,
            n_effective,
        }
    }
}

/// The rows of a dataset reference as JSON, read with the data stage's readers.
pub fn load_docs(suite: &Suite, dataset: &DatasetRef) -> Result<Vec<Doc>> {
    use crate::data::source;
    let resolved = match (&dataset.path, &dataset.hub) {
        (Some(p), _) => source::DatasetFiles {
            files: source::expand(&suite.base_dir.join(p))?,
            options: dataset.read.clone(),
        },
        (None, Some(hub)) => source::hub_files(
            hub,
            dataset.config.as_deref(),
            dataset.split.as_deref().unwrap_or("test"),
            dataset.revision.as_deref(),
            source::mirror_dir(suite.mirror.as_ref().map(|m| suite.base_dir.join(m))).as_deref(),
            dataset.read.clone(),
        )?,
        (None, None) => bail!("dataset without path or hub"),
    };
    let mut docs = Vec::new();
    for file in &resolved.files {
        let mut df = source::read_file(file, &resolved.options)?;
        let mut buf = Vec::new();
        polars::prelude::JsonWriter::new(&mut buf)
            .with_json_format(polars::prelude::JsonFormat::JsonLines)
            .finish(&mut df)
            .map_err(|e| anyhow!("cannot convert rows of {}: {e}", file.display()))?;
        for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            docs.push(
                serde_json::from_slice(line)
                    .with_context(|| format!("row of {}", file.display()))?,
            );
        }
    }
    Ok(docs)
}

/// The templates of one task, compiled once.
pub struct Templates {
    env: minijinja::Environment<'static>,
}

impl Templates {
    pub fn new(task: &TaskConfig) -> Result<Self> {
        let mut env = documents::environment();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .keep_trailing_newline(true)
            .build()
            .map_err(|e| anyhow!("{e}"))?;
        env.set_syntax(syntax);
        env.add_template_owned("context", task.context.clone())?;
        if let Some(t) = &task.target {
            env.add_template_owned("target", t.clone())?;
        }
        match &task.choices {
            Some(super::suite::Choices::Each(list)) => {
                for (i, c) in list.iter().enumerate() {
                    env.add_template_owned(format!("choice{i}"), c.clone())?;
                }
            }
            Some(super::suite::Choices::List(s)) => env.add_template_owned("choices", s.clone())?,
            None => {}
        }
        Ok(Self { env })
    }

    /// Renders template `name` for a document.
    pub fn render(&self, name: &str, doc: &Doc) -> Result<String> {
        let t = self.env.get_template(name).map_err(|e| anyhow!("{e}"))?;
        t.render(minijinja::Value::from(minijinja::value::Serde(doc)))
            .map_err(|e| anyhow!("template `{name}`: {e}"))
    }

    /// The choices of a document.
    pub fn choices(&self, task: &TaskConfig, doc: &Doc) -> Result<Vec<String>> {
        match &task.choices {
            Some(super::suite::Choices::Each(list)) => (0..list.len())
                .map(|i| self.render(&format!("choice{i}"), doc))
                .collect(),
            Some(super::suite::Choices::List(_)) => {
                let text = self.render("choices", doc)?;
                serde_json::from_str(&text).map_err(|_| {
                    anyhow!("`choices` must render a JSON list of strings, got {text}")
                })
            }
            None => bail!("task has no choices"),
        }
    }

    /// The rendered target: a JSON list of references, or one string; never empty.
    pub fn targets(&self, doc: &Doc) -> Result<Vec<String>> {
        let text = self.render("target", doc)?;
        if text.trim_start().starts_with('[') {
            if let Ok(list) = serde_json::from_str::<Vec<String>>(&text) {
                if list.is_empty() {
                    bail!("`target` rendered an empty list: the document has no reference answer");
                }
                return Ok(list);
            }
        }
        Ok(vec![text])
    }
}

/// The prompts of a task: few-shot examples (seeded, never the scored document) + the context,
/// optionally sent through the model's chat template.
pub struct Prompter<'a> {
    task: &'a TaskConfig,
    templates: &'a Templates,
    pool: Vec<Doc>,
    chat: Option<ChatTemplate>,
}

impl<'a> Prompter<'a> {
    pub fn new(
        suite: &Suite,
        task: &'a TaskConfig,
        templates: &'a Templates,
        docs: &[Doc],
        tokenizer: &ModelTokenizer,
    ) -> Result<Self> {
        let pool = if task.num_fewshot == 0 {
            Vec::new()
        } else if let Some(d) = &task.fewshot_dataset {
            documents::prepare(task, load_docs(suite, d)?)?
        } else {
            docs.to_vec()
        };
        let chat = if task.apply_chat_template {
            let source = tokenizer.chat_template.as_deref().ok_or_else(|| {
                anyhow!("apply_chat_template is set, but the model has no chat template")
            })?;
            Some(
                ChatTemplate::new(
                    source,
                    tokenizer.bos_token.as_deref(),
                    tokenizer.eos_token.as_deref(),
                )
                .with_context(|| match &tokenizer.chat_template_file {
                    Some(file) => format!("the chat template in {}", file.display()),
                    None => "the model's chat template".into(),
                })?,
            )
        } else {
            None
        };
        Ok(Self {
            task,
            templates,
            pool,
            chat,
        })
    }

    /// The text the model reads for document number `index`.
    pub fn context(&self, doc: &Doc, index: usize) -> Result<String> {
        let mut out = self.task.description.clone();
        if self.task.num_fewshot > 0 {
            let mut rng =
                ChaCha8Rng::seed_from_u64(self.task.fewshot_seed.wrapping_add(index as u64));
            let candidates: Vec<&Doc> = self.pool.iter().filter(|d| *d != doc).collect();
            let shots: Vec<&&Doc> = candidates
                .choose_multiple(&mut rng, self.task.num_fewshot)
                .collect();
            for shot in shots {
                out.push_str(&self.templates.render("context", shot)?);
                out.push_str(&self.task.target_delimiter);
                out.push_str(&self.target_text(shot).context("a few-shot example")?);
                out.push_str(&self.task.fewshot_delimiter);
            }
        }
        out.push_str(&self.templates.render("context", doc)?);
        match &self.chat {
            Some(chat) => chat.render(
                &[Message {
                    role: "user".into(),
                    content: out,
                }],
                true,
            ),
            None => Ok(out),
        }
    }

    /// The gold answer as text (a choice's text for multiple choice).
    fn target_text(&self, doc: &Doc) -> Result<String> {
        let targets = self.templates.targets(doc)?;
        if self.task.choices.is_some() {
            let choices = self.templates.choices(self.task, doc)?;
            let gold = gold_index(&targets[0], &choices)?;
            return Ok(choices[gold].clone());
        }
        Ok(targets.into_iter().next().unwrap_or_default())
    }
}

/// The gold choice: an index, or the text of one of the choices.
pub fn gold_index(target: &str, choices: &[String]) -> Result<usize> {
    let t = target.trim();
    if let Ok(i) = t.parse::<usize>() {
        if i < choices.len() {
            return Ok(i);
        }
        bail!(
            "target index {i} is out of range for {} choices",
            choices.len()
        );
    }
    choices.iter().position(|c| c.trim() == t).ok_or_else(|| {
        anyhow!("target `{t}` is neither a choice index nor one of the choices {choices:?}")
    })
}
