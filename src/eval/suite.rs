//! Evaluation suites in TOML: tasks are configuration (dataset, prompt templates, metrics), the
//! harness is code. Loading checks every task and names the file, task and key on errors.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

use super::filters::FilterPipeline;
use super::metrics::{AnswerMatch, ExactOptions};

/// A suite file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Suite {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Longest input given to the model (default: the model's max_position_embeddings).
    #[serde(default)]
    pub max_length: Option<usize>,
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Hub datasets are read from `<mirror>/<org>/<name>/...` when set (or FEINSCHLIFF_MIRROR).
    #[serde(default)]
    pub mirror: Option<String>,
    #[serde(rename = "task")]
    pub tasks: Vec<TaskConfig>,
    #[serde(default, rename = "gate")]
    pub gates: Vec<Gate>,
    /// The suite file's folder, against which relative paths are read.
    #[serde(skip)]
    pub base_dir: PathBuf,
    #[serde(skip)]
    pub source: PathBuf,
}

fn default_batch_size() -> usize {
    8
}

/// What a task measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    /// Pick the choice with the highest log-likelihood: acc, acc_norm.
    MultipleChoice,
    /// Greedy generation until a stop string: exact_match, f1.
    Generate,
    /// Rolling-window log-likelihood of documents: word_perplexity, byte_perplexity, bits_per_byte.
    Perplexity,
}

/// Where a task's rows come from: a local file, or a Hub dataset (through the mirror or cache).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetRef {
    #[serde(default)]
    pub path: Option<String>,
    #[serde(default)]
    pub hub: Option<String>,
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub split: Option<String>,
    #[serde(default)]
    pub revision: Option<String>,
    /// How to read the file (delimiter, has_header, file_type, records, rename, ...).
    #[serde(default)]
    pub read: crate::data::source::ReadOptions,
}

/// One task of a suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskConfig {
    pub name: String,
    pub kind: TaskKind,
    pub dataset: DatasetRef,
    /// The dataset's license as its source states it; reports flag non-commercial ones.
    pub license: String,
    #[serde(default)]
    pub non_commercial: bool,
    /// Template of the context (the prompt); a document template for perplexity.
    pub context: String,
    /// Multiple choice: a template per choice (`["{{ mc_answer1 }}", ...]`) or one template that
    /// renders a JSON list (`"{{ choices | tojson }}"`).
    #[serde(default)]
    pub choices: Option<Choices>,
    /// Template of the gold answer: a choice index or choice text (multiple choice), the reference
    /// text or a JSON list of references (generate).
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default = "default_target_delimiter")]
    pub target_delimiter: String,
    #[serde(default = "default_fewshot_delimiter")]
    pub fewshot_delimiter: String,
    #[serde(default)]
    pub num_fewshot: usize,
    /// Where few-shot examples come from (default: the task's own rows, never the scored one).
    #[serde(default)]
    pub fewshot_dataset: Option<DatasetRef>,
    #[serde(default = "default_fewshot_seed")]
    pub fewshot_seed: u64,
    /// Text put before every prompt (lm-eval's description).
    #[serde(default)]
    pub description: String,
    /// Send the prompt as a user message through the model's chat template (lm-eval's
    /// --apply_chat_template), for chat-tuned models and adapters.
    #[serde(default)]
    pub apply_chat_template: bool,
    /// Generate: stop strings.
    #[serde(default = "default_until")]
    pub until: Vec<String>,
    /// Generate: most new tokens.
    #[serde(default = "default_max_gen_toks")]
    pub max_gen_toks: usize,
    /// Generate: how predictions are compared with the references (default `squad_de`).
    #[serde(default)]
    pub answer_match: AnswerMatch,
    /// Generate with `answer_match = "exact"`: compare without case.
    #[serde(default)]
    pub ignore_case: bool,
    /// Generate with `answer_match = "exact"`: compare without ASCII punctuation.
    #[serde(default)]
    pub ignore_punctuation: bool,
    /// Generate: named post-processing pipelines of the raw generation (lm-eval's
    /// `filter_list`); each metric is then reported per pipeline as `<metric>,<name>`.
    #[serde(default, rename = "filter")]
    pub filters: Vec<FilterPipeline>,
    /// Documents are kept where this expression is true (`"sentence1 and sentence2"`); checked
    /// before `process_docs`, as lm-eval's `process_docs` functions filter then map.
    #[serde(default)]
    pub keep: Option<String>,
    /// Fields rewritten before prompting, in order, each an expression over the document as
    /// rewritten so far (lm-eval's `process_docs`).
    #[serde(default)]
    pub process_docs: Vec<ProcessStep>,
    /// The lm-evaluation-harness task this one reproduces; none for Feinschliff-native tasks.
    #[serde(default)]
    pub lm_eval: Option<LmEvalReference>,
    /// Metrics to report (defaults per kind).
    #[serde(default)]
    pub metrics: Vec<String>,
    #[serde(default = "default_version")]
    pub version: f64,
}

/// One rewrite of a document field: `{ set = "sentence1", to = "sentence1 | strip" }`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessStep {
    pub set: String,
    pub to: String,
}

/// The lm-eval version whose task definitions the `lm_eval` references were checked against.
pub const LM_EVAL_VERSION: &str = "0.4.13";

/// The lm-evaluation-harness task a task reproduces: its name, and the split lm-eval scores when
/// the task has to score another one (the local copy lacks it).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LmEvalReference {
    pub task: String,
    #[serde(default)]
    pub split: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Choices {
    Each(Vec<String>),
    List(String),
}

fn default_target_delimiter() -> String {
    " ".into()
}
fn default_fewshot_delimiter() -> String {
    "\n\n".into()
}
fn default_fewshot_seed() -> u64 {
    1234
}
fn default_until() -> Vec<String> {
    vec!["\n\n".into()]
}
fn default_max_gen_toks() -> usize {
    64
}
fn default_version() -> f64 {
    1.0
}

/// A bound on one task's metric: an absolute minimum and/or a maximum drop against a baseline.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gate {
    pub task: String,
    pub metric: String,
    #[serde(default)]
    pub min: Option<f64>,
    #[serde(default)]
    pub max: Option<f64>,
    /// Largest allowed drop below the baseline (for lower-is-better metrics: largest rise).
    #[serde(default)]
    pub max_drop: Option<f64>,
}

impl TaskKind {
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            TaskKind::MultipleChoice => &["acc", "acc_norm"],
            TaskKind::Generate => &["exact_match", "f1"],
            TaskKind::Perplexity => &["word_perplexity", "byte_perplexity", "bits_per_byte"],
        }
    }
}

/// Whether a larger value of `metric` is better.
pub fn higher_is_better(metric: &str) -> bool {
    !matches!(
        metric,
        "word_perplexity" | "byte_perplexity" | "bits_per_byte" | "perplexity"
    )
}

impl TaskConfig {
    /// The metrics this task computes, before filters.
    pub fn base_metrics(&self) -> Vec<String> {
        if !self.metrics.is_empty() {
            return self.metrics.clone();
        }
        let defaults = match self.kind {
            TaskKind::Generate => self.answer_match.metrics(),
            kind => kind.metrics(),
        };
        defaults.iter().map(|s| s.to_string()).collect()
    }

    /// The metrics this task reports: `<metric>` or, with filters, `<metric>,<filter>` each.
    pub fn metric_names(&self) -> Vec<String> {
        let base = self.base_metrics();
        if self.filters.is_empty() {
            return base;
        }
        base.iter()
            .flat_map(|m| self.filters.iter().map(move |f| format!("{m},{}", f.name)))
            .collect()
    }

    /// The options of `answer_match = "exact"`.
    pub fn exact_options(&self) -> ExactOptions {
        ExactOptions {
            ignore_case: self.ignore_case,
            ignore_punctuation: self.ignore_punctuation,
        }
    }

    /// What this task's scores can be compared with, for reports.
    pub fn comparability(&self) -> String {
        let Some(reference) = &self.lm_eval else {
            return "Feinschliff-native: not comparable to lm-eval or leaderboard numbers".into();
        };
        let mut text = format!("lm-eval {LM_EVAL_VERSION} `{}`", reference.task);
        if let (Some(theirs), Some(ours)) = (&reference.split, &self.dataset.split) {
            if theirs != ours {
                text.push_str(&format!(
                    ", except the split: scored on `{ours}`, lm-eval scores `{theirs}` (not in the local copy)"
                ));
            }
        }
        text
    }
}

impl Suite {
    /// Reads and checks a suite file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path, "suite")?;
        let mut suite: Suite =
            toml::from_str(&text).map_err(|e| anyhow!("suite {}: {e}", path.display()))?;
        suite.source = path.to_path_buf();
        suite.base_dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        suite.validate()?;
        Ok(suite)
    }

    fn validate(&self) -> Result<()> {
        let at = |task: &str, msg: String| {
            anyhow!("suite {}: task `{task}`: {msg}", self.source.display())
        };
        if self.tasks.is_empty() {
            bail!("suite {}: has no [[task]]", self.source.display());
        }
        if self.max_length == Some(0) {
            bail!(
                "suite {}: `max_length` must be at least 1 (leave it out to use the model's max_position_embeddings)",
                self.source.display()
            );
        }
        if self.batch_size == 0 {
            bail!(
                "suite {}: `batch_size` must be at least 1",
                self.source.display()
            );
        }
        let mut names = std::collections::HashSet::new();
        for t in &self.tasks {
            if !names.insert(&t.name) {
                return Err(at(&t.name, "the name is used twice".into()));
            }
            if t.dataset.path.is_some() == t.dataset.hub.is_some() {
                return Err(at(
                    &t.name,
                    "dataset must set exactly one of `path` and `hub`".into(),
                ));
            }
            let allowed = match t.kind {
                TaskKind::Generate => t.answer_match.metrics(),
                kind => kind.metrics(),
            };
            if let Some(m) = t.metrics.iter().find(|m| !allowed.contains(&m.as_str())) {
                return Err(at(
                    &t.name,
                    format!(
                        "metric `{m}` is not one of {} for kind {:?} with answer_match {:?}",
                        allowed.join(", "),
                        t.kind,
                        t.answer_match
                    ),
                ));
            }
            if t.kind != TaskKind::Generate && !t.filters.is_empty() {
                return Err(at(
                    &t.name,
                    "`filter` applies to generate tasks only".into(),
                ));
            }
            if (t.ignore_case || t.ignore_punctuation) && t.answer_match != AnswerMatch::Exact {
                return Err(at(
                    &t.name,
                    "`ignore_case` and `ignore_punctuation` need `answer_match = \"exact\"`".into(),
                ));
            }
            for f in &t.filters {
                f.validate().map_err(|e| at(&t.name, format!("{e}")))?;
                if f.name.is_empty() || f.name == "none" || f.name.contains(',') {
                    return Err(at(
                        &t.name,
                        format!(
                            "filter name `{}` must be non-empty, not `none`, without commas",
                            f.name
                        ),
                    ));
                }
            }
            super::tasks::documents::check(t).map_err(|e| at(&t.name, format!("{e:#}")))?;
            match t.kind {
                TaskKind::MultipleChoice => {
                    if t.choices.is_none() || t.target.is_none() {
                        return Err(at(
                            &t.name,
                            "multiple_choice needs `choices` and `target`".into(),
                        ));
                    }
                }
                TaskKind::Generate => {
                    if t.target.is_none() {
                        return Err(at(&t.name, "generate needs `target`".into()));
                    }
                }
                TaskKind::Perplexity => {}
            }
            let mut env = minijinja::Environment::new();
            let mut templates = vec![("context", t.context.clone())];
            templates.extend(t.target.clone().map(|x| ("target", x)));
            match &t.choices {
                Some(Choices::Each(list)) => {
                    templates.extend(list.iter().map(|c| ("choices", c.clone())))
                }
                Some(Choices::List(s)) => templates.push(("choices", s.clone())),
                None => {}
            }
            for (key, source) in templates {
                env.add_template_owned("check", source)
                    .map_err(|e| at(&t.name, format!("`{key}` is not a valid template: {e}")))?;
            }
        }
        for g in &self.gates {
            let Some(task) = self.tasks.iter().find(|t| t.name == g.task) else {
                bail!(
                    "suite {}: gate names unknown task `{}`",
                    self.source.display(),
                    g.task
                );
            };
            if !task.metric_names().contains(&g.metric) {
                bail!(
                    "suite {}: gate on `{}` names metric `{}`, which the task does not report ({})",
                    self.source.display(),
                    g.task,
                    g.metric,
                    task.metric_names().join(", ")
                );
            }
        }
        Ok(())
    }

    /// Keeps only the named tasks (`--tasks a,b`); an unknown name is an error.
    pub fn select(&mut self, names: &[String]) -> Result<()> {
        if names.is_empty() {
            return Ok(());
        }
        for n in names {
            if !self.tasks.iter().any(|t| &t.name == n) {
                bail!(
                    "suite {} has no task `{n}`; it has: {}",
                    self.source.display(),
                    self.tasks
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
        }
        self.tasks.retain(|t| names.contains(&t.name));
        self.gates.retain(|g| names.contains(&g.task));
        Ok(())
    }
}
