//! The eval stage: scores a base model (and base + adapter) on declarative suites with
//! lm-evaluation-harness's semantics, writes reports and checks gates. Entry points: [`evaluate`]
//! for a loaded model, [`run`] for `feinschliff eval`.

pub mod chart;
pub mod encoding;
pub mod filters;
pub mod functions;
pub mod metrics;
pub mod report;
pub mod scorer;
pub mod suite;
pub mod tasks;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::{Path, PathBuf};

use crate::fsutil::{write_atomic, StagedDir};
use crate::model::Model;
use report::{GateOutcome, RunInfo, Scores};
use scorer::Scorer;
use suite::{Suite, TaskKind};
use tasks::TaskResult;

/// Scores `model` on every task of `suite`, at most `limit` documents per task.
pub fn evaluate(model: &Model, suite: &Suite, limit: Option<usize>) -> Result<Vec<TaskResult>> {
    let scorer = Scorer::new(model, suite.max_length, suite.batch_size);
    let mut results = Vec::new();
    for task in &suite.tasks {
        let docs = tasks::load_docs(suite, &task.dataset)
            .and_then(|docs| tasks::documents::prepare(task, docs))
            .with_context(|| format!("task `{}`", task.name))?;
        let n_original = docs.len();
        let docs = &docs[..limit.unwrap_or(docs.len()).min(docs.len())];
        let bar = progress(&task.name);
        let result = match task.kind {
            TaskKind::MultipleChoice => {
                tasks::multiple_choice::run(suite, task, docs, n_original, &scorer, &bar)
            }
            TaskKind::Generate => {
                tasks::generate::run(suite, task, docs, n_original, &scorer, &bar)
            }
            TaskKind::Perplexity => tasks::perplexity::run(task, docs, n_original, &scorer, &bar),
        }
        .with_context(|| format!("task `{}`", task.name))?;
        bar.finish_and_clear();
        let summary: Vec<String> = result
            .metrics
            .iter()
            .map(|(m, (v, _))| format!("{m} {v:.4}"))
            .collect();
        tracing::info!(
            "{}: {} ({} documents)",
            task.name,
            summary.join(", "),
            result.n_effective
        );
        results.push(result);
    }
    Ok(results)
}

fn progress(task: &str) -> ProgressBar {
    let bar = ProgressBar::new(0);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>16} {bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}]",
    ) {
        bar.set_style(style);
    }
    bar.set_prefix(task.to_string());
    bar
}

/// What `feinschliff eval` is asked to do.
pub struct EvalOptions {
    pub model: String,
    pub adapter: Option<PathBuf>,
    pub suite: PathBuf,
    pub tasks: Vec<String>,
    pub limit: Option<usize>,
    pub out: PathBuf,
    pub baseline: Option<PathBuf>,
    pub device: String,
    pub force: bool,
}

/// The scores of a finished evaluation and its gates.
pub struct EvalOutcome {
    pub out: PathBuf,
    pub scores: Scores,
    pub gates: Vec<GateOutcome>,
}

impl EvalOutcome {
    /// The messages of the gates that failed.
    pub fn failures(&self) -> Vec<&str> {
        self.gates
            .iter()
            .filter_map(|g| g.failure.as_deref())
            .collect()
    }
}

/// Loads the model (and adapter), evaluates, writes the reports, checks the gates.
pub fn run(opts: &EvalOptions) -> Result<EvalOutcome> {
    let mut suite = Suite::load(&opts.suite)?;
    suite.select(&opts.tasks)?;
    let baseline = opts
        .baseline
        .as_deref()
        .map(report::read_scores)
        .transpose()?;
    let staged = StagedDir::create(&opts.out, opts.force)?;
    let device = crate::device::open(&opts.device)?;
    let memory = crate::device::PeakMemory::watch(&device);
    tracing::info!("evaluating on {}", crate::device::describe(&device));
    let base = crate::model::locate(&opts.model, Path::new(&opts.model), None, None)?;
    let mut model = Model::load(&base.dir, None, &device)?;
    if let Some(a) = &opts.adapter {
        model.load_adapter(a)?;
    }
    let results = evaluate(&model, &suite, opts.limit)?;
    if let Some(peak) = memory.finish() {
        tracing::info!("{peak}");
    }
    let adapter = opts.adapter.as_ref().map(|a| a.display().to_string());
    let info = RunInfo {
        model: &opts.model,
        adapter: adapter.as_deref(),
        limit: opts.limit,
        max_length: suite
            .max_length
            .unwrap_or(model.lm.config.max_position_embeddings),
        batch_size: suite.batch_size,
    };
    let gates = write_reports(
        staged.path(),
        &suite,
        (&results, None),
        &info,
        baseline.as_ref(),
    )?;
    let out = staged.commit()?;
    let scores = report::scores_of(&report::results_json(&suite, &results, &info));
    Ok(EvalOutcome { out, scores, gates })
}

/// Writes results.json, samples_<task>.jsonl, report.md, eval.svg (with `base_results`, the base
/// model's, beside them where it ran) and junit.xml into `dir`; returns the gates.
pub fn write_reports(
    dir: &Path,
    suite: &Suite,
    (results, base_results): (&[TaskResult], Option<&[TaskResult]>),
    info: &RunInfo,
    baseline: Option<&Scores>,
) -> Result<Vec<GateOutcome>> {
    let json = report::results_json(suite, results, info);
    let scores = report::scores_of(&json);
    let gates = report::check_gates(&suite.gates, &scores, baseline);
    write_atomic(
        &dir.join("results.json"),
        serde_json::to_string_pretty(&json)?.as_bytes(),
    )?;
    report::write_samples(dir, results)?;
    chart::write(dir, &suite.name, &chart::rows(results, base_results))?;
    write_atomic(
        &dir.join("report.md"),
        report::markdown(suite, &scores, baseline, &gates).as_bytes(),
    )?;
    write_atomic(
        &dir.join("junit.xml"),
        report::junit(suite, &scores, &gates).as_bytes(),
    )?;
    Ok(gates)
}
