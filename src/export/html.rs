//! report.html: one self-contained page about a run (no scripts, no network): the training
//! numbers and curves, the data summary, the eval table with base, adapted, deltas and standard
//! errors, the gates, sample generations of base and adapted model, and the recipe.

use anyhow::{Context, Result};
use serde_json::Value;
use std::fmt::Write as _;
use std::path::Path;

use crate::eval::report::{xml_escape as escape, GateOutcome};
use crate::eval::tasks::TaskResult;
use crate::fsutil::write_atomic;
use crate::train::TrainSummary;

/// The file's name in the run folder.
pub const FILE: &str = "report.html";

/// One suite's results for the report.
pub struct SuiteResults {
    pub name: String,
    pub base: Option<Vec<TaskResult>>,
    pub adapted: Vec<TaskResult>,
    pub gates: Vec<GateOutcome>,
}

/// What the report is made from.
pub struct ReportInput<'a> {
    pub base_model: &'a str,
    pub summary: &'a TrainSummary,
    /// `data inspect`'s summary of the training data.
    pub data_summary: &'a str,
    pub suites: &'a [SuiteResults],
}

/// Sample generations shown per generate task.
const SAMPLES_PER_TASK: usize = 3;

fn value(v: f64, stderr: Option<f64>) -> String {
    match stderr.filter(|s| s.is_finite()) {
        Some(s) => format!("{v:.4} ± {s:.4}"),
        None => format!("{v:.4}"),
    }
}

/// The page for the run in `dir` (its loss.svg and recipe.resolved.toml are read from there).
pub fn render(dir: &Path, input: &ReportInput) -> Result<String> {
    let s = input.summary;
    let mut h = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Feinschliff run</title>\n<style>\nbody{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}\ntable{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top;overflow-wrap:anywhere}\npre{background:#f6f6f6;padding:1em;overflow-x:auto;white-space:pre-wrap}\n.pass{color:#17692c}.fail{color:#b00020;font-weight:bold}.up{color:#17692c}.down{color:#b00020}\n</style></head><body>\n",
    );
    let _ = writeln!(
        h,
        "<h1>Feinschliff run</h1>\n<p>LoRA adapter on <b>{}</b>: {} steps, loss {:.4} → {:.4}{}, {:.0} tokens/s.</p>",
        escape(input.base_model),
        s.steps,
        s.first_loss,
        s.last_loss,
        s.val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
        s.tokens_per_s
    );
    h.push_str("<h2>Training curves</h2>\n");
    match std::fs::read_to_string(dir.join(crate::train::plot::CHART_FILE)) {
        Ok(svg) => h.push_str(&svg),
        Err(_) => h.push_str("<p>No curves (no step had a finite loss).</p>\n"),
    }
    let _ = writeln!(
        h,
        "<h2>Data</h2>\n<pre>{}</pre>",
        escape(input.data_summary)
    );
    for suite in input.suites {
        eval_section(&mut h, suite);
    }
    let recipe = std::fs::read_to_string(dir.join("recipe.resolved.toml"))
        .with_context(|| format!("cannot read {}", dir.join("recipe.resolved.toml").display()))?;
    let _ = writeln!(h, "<h2>Recipe</h2>\n<pre>{}</pre>", escape(&recipe));
    h.push_str("</body></html>\n");
    Ok(h)
}

fn eval_section(h: &mut String, suite: &SuiteResults) {
    let _ = writeln!(
        h,
        "<h2>Evaluation: {}</h2>\n<table><tr><th>task</th><th>metric</th><th>base</th><th>adapted</th><th>delta</th></tr>",
        escape(&suite.name)
    );
    for task in &suite.adapted {
        let base = suite
            .base
            .as_ref()
            .and_then(|b| b.iter().find(|r| r.name == task.name));
        for (metric, (v, se)) in &task.metrics {
            let b = base.and_then(|b| b.metrics.get(metric));
            let (base_cell, delta_cell) = match b {
                Some((bv, bse)) => {
                    let d = v - bv;
                    let better = crate::eval::suite::higher_is_better(metric) == (d > 0.0);
                    let class = if d == 0.0 {
                        ""
                    } else if better {
                        "up"
                    } else {
                        "down"
                    };
                    (
                        value(*bv, *bse),
                        format!("<span class=\"{class}\">{d:+.4}</span>"),
                    )
                }
                None => ("–".into(), "–".into()),
            };
            let _ = writeln!(
                h,
                "<tr><td>{}</td><td>{}</td><td>{base_cell}</td><td>{}</td><td>{delta_cell}</td></tr>",
                escape(&task.name),
                escape(metric),
                value(*v, *se)
            );
        }
    }
    h.push_str("</table>\n");
    let rows = crate::eval::chart::rows(&suite.adapted, suite.base.as_deref());
    h.push_str(&crate::eval::chart::svg(&suite.name, &rows));
    if !suite.gates.is_empty() {
        h.push_str("<h3>Gates</h3>\n<ul>\n");
        for g in &suite.gates {
            let outcome = match &g.failure {
                Some(why) => format!("<span class=\"fail\">failed</span>: {}", escape(why)),
                None => "<span class=\"pass\">passed</span>".into(),
            };
            let _ = writeln!(
                h,
                "<li>{} {} {}: {outcome}</li>",
                escape(&g.task),
                escape(&g.metric),
                escape(&g.description)
            );
        }
        h.push_str("</ul>\n");
    }
    for task in suite.adapted.iter().filter(|t| is_generation(t)) {
        let base = suite
            .base
            .as_ref()
            .and_then(|b| b.iter().find(|r| r.name == task.name));
        let _ = writeln!(
            h,
            "<h3>Sample answers: {}</h3>\n<table><tr><th>prompt</th><th>reference</th><th>base</th><th>adapted</th></tr>",
            escape(&task.name)
        );
        for (i, sample) in task.samples.iter().take(SAMPLES_PER_TASK).enumerate() {
            let text = |v: &Value| escape(v.as_str().unwrap_or(""));
            let base_answer = base
                .and_then(|b| b.samples.get(i))
                .map(|s| text(&s["prediction"]))
                .unwrap_or_else(|| "–".into());
            let references = sample["references"]
                .as_array()
                .map(|r| r.iter().map(text).collect::<Vec<_>>().join(" | "))
                .unwrap_or_default();
            let _ = writeln!(
                h,
                "<tr><td><pre>{}</pre></td><td>{references}</td><td>{base_answer}</td><td>{}</td></tr>",
                text(&sample["context"]),
                text(&sample["prediction"])
            );
        }
        h.push_str("</table>\n");
    }
}

fn is_generation(task: &TaskResult) -> bool {
    task.samples
        .first()
        .is_some_and(|s| s.get("prediction").is_some_and(Value::is_string))
}

/// Writes report.html into the run folder `dir`.
pub fn write(dir: &Path, input: &ReportInput) -> Result<()> {
    write_atomic(&dir.join(FILE), render(dir, input)?.as_bytes())
}
