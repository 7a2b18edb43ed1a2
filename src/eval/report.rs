//! Reports of an evaluation: results.json in lm-evaluation-harness's schema, per-sample JSONL,
//! a Markdown table (base vs adapted, with deltas), JUnit XML for CI, and the gate checks.

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::suite::{higher_is_better, Gate, Suite};
use super::tasks::TaskResult;
use crate::fsutil::write_atomic;

/// task → metric → value, the comparable core of a results file.
pub type Scores = BTreeMap<String, BTreeMap<String, f64>>;

/// What was evaluated, for the results file.
pub struct RunInfo<'a> {
    pub model: &'a str,
    pub adapter: Option<&'a str>,
    pub limit: Option<usize>,
    pub max_length: usize,
    pub batch_size: usize,
}

/// results.json as lm-eval writes it (`results[task]["acc,none"]`, `"acc_stderr,none"`, ...).
pub fn results_json(suite: &Suite, results: &[TaskResult], info: &RunInfo) -> Value {
    let mut res = Map::new();
    let mut comparability = Map::new();
    let (mut configs, mut versions, mut nshot, mut hib, mut nsamples, mut licenses) = (
        Map::new(),
        Map::new(),
        Map::new(),
        Map::new(),
        Map::new(),
        Map::new(),
    );
    for r in results {
        let task = suite.tasks.iter().find(|t| t.name == r.name);
        let mut m = Map::new();
        m.insert("alias".into(), json!(r.name));
        let mut better = Map::new();
        for (name, (value, stderr)) in &r.metrics {
            let (metric, filter) = name.split_once(',').unwrap_or((name, "none"));
            m.insert(format!("{metric},{filter}"), json!(value));
            m.insert(
                format!("{metric}_stderr,{filter}"),
                stderr.map(|s| json!(s)).unwrap_or(json!("N/A")),
            );
            better.insert(name.clone(), json!(higher_is_better(metric)));
        }
        res.insert(r.name.clone(), Value::Object(m));
        hib.insert(r.name.clone(), Value::Object(better));
        nsamples.insert(
            r.name.clone(),
            json!({"original": r.n_original, "effective": r.n_effective}),
        );
        if let Some(t) = task {
            configs.insert(
                r.name.clone(),
                serde_json::to_value(t).unwrap_or(Value::Null),
            );
            versions.insert(r.name.clone(), json!(t.version));
            nshot.insert(r.name.clone(), json!(t.num_fewshot));
            licenses.insert(
                r.name.clone(),
                json!({"license": t.license, "non_commercial": t.non_commercial}),
            );
            comparability.insert(r.name.clone(), json!(t.comparability()));
        }
    }
    let model_args = match info.adapter {
        Some(a) => format!("pretrained={},peft={}", info.model, a),
        None => format!("pretrained={}", info.model),
    };
    json!({
        "results": res,
        "configs": configs,
        "versions": versions,
        "n-shot": nshot,
        "higher_is_better": hib,
        "n-samples": nsamples,
        "licenses": licenses,
        "comparable_to": comparability,
        "config": {
            "model": "feinschliff",
            "model_args": model_args,
            "batch_size": info.batch_size,
            "max_length": info.max_length,
            "limit": info.limit,
        },
        "model_name": info.model,
        "adapter": info.adapter,
        "suite": suite.name,
        "date": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "feinschliff_version": env!("CARGO_PKG_VERSION"),
    })
}

/// The metric values of a results.json (ours or lm-eval's): `acc,none` is `acc`, a filtered
/// `exact_match,flexible-extract` keeps its filter.
pub fn scores_of(results: &Value) -> Scores {
    let mut out = Scores::new();
    if let Some(tasks) = results.get("results").and_then(Value::as_object) {
        for (task, metrics) in tasks {
            let Some(metrics) = metrics.as_object() else {
                continue;
            };
            for (key, v) in metrics {
                let (Some((metric, filter)), Some(v)) = (key.split_once(','), v.as_f64()) else {
                    continue;
                };
                if metric.ends_with("_stderr") {
                    continue;
                }
                let name = match filter {
                    "none" => metric.to_string(),
                    _ => key.clone(),
                };
                out.entry(task.clone()).or_default().insert(name, v);
            }
        }
    }
    out
}

/// Reads the scores of a results.json file.
pub fn read_scores(path: &Path) -> Result<Scores> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read baseline {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let s = scores_of(&v);
    if s.is_empty() {
        bail!(
            "{} has no `results` with metrics (expected a results.json of feinschliff or lm-eval)",
            path.display()
        );
    }
    Ok(s)
}

/// One gate checked: its description and, when missed, why.
#[derive(Debug, Clone)]
pub struct GateOutcome {
    pub task: String,
    pub metric: String,
    pub description: String,
    pub failure: Option<String>,
}

/// Checks every gate; `baseline` is needed for max_drop.
pub fn check_gates(gates: &[Gate], scores: &Scores, baseline: Option<&Scores>) -> Vec<GateOutcome> {
    let mut out = Vec::new();
    for g in gates {
        let value = scores.get(&g.task).and_then(|m| m.get(&g.metric)).copied();
        let mut push = |description: String, failure: Option<String>| {
            out.push(GateOutcome {
                task: g.task.clone(),
                metric: g.metric.clone(),
                description,
                failure,
            });
        };
        let Some(v) = value else {
            push(
                "present".into(),
                Some(format!(
                    "gate failed: {} {} was not measured",
                    g.task, g.metric
                )),
            );
            continue;
        };
        if let Some(min) = g.min {
            push(
                format!(">= {min}"),
                (v < min).then(|| {
                    format!(
                        "gate failed: {} {} = {v:.4} is below the minimum {min}",
                        g.task, g.metric
                    )
                }),
            );
        }
        if let Some(max) = g.max {
            push(
                format!("<= {max}"),
                (v > max).then(|| {
                    format!(
                        "gate failed: {} {} = {v:.4} is above the maximum {max}",
                        g.task, g.metric
                    )
                }),
            );
        }
        if let Some(drop) = g.max_drop {
            let base = baseline
                .and_then(|b| b.get(&g.task))
                .and_then(|m| m.get(&g.metric))
                .copied();
            match base {
                None => push(
                    format!("drop <= {drop}"),
                    Some(format!(
                        "gate failed: {} {}: max_drop needs a baseline value, none was given",
                        g.task, g.metric
                    )),
                ),
                Some(b) => {
                    let worse = if higher_is_better(&g.metric) {
                        b - v
                    } else {
                        v - b
                    };
                    push(
                        format!("drop <= {drop} vs baseline {b:.4}"),
                        (worse > drop).then(|| format!("gate failed: {} {} = {v:.4} is {worse:.4} worse than the baseline {b:.4} (allowed: {drop})", g.task, g.metric)),
                    );
                }
            }
        }
    }
    out
}

/// The Markdown table: one row per task and metric, with base, adapted and delta when both ran.
pub fn markdown(
    suite: &Suite,
    adapted: &Scores,
    base: Option<&Scores>,
    gates: &[GateOutcome],
) -> String {
    let mut s = format!("# Evaluation: {}\n\n", suite.name);
    if base.is_some() {
        s.push_str("| task | metric | base | adapted | delta |\n|---|---|---|---|---|\n");
    } else {
        s.push_str("| task | metric | value |\n|---|---|---|\n");
    }
    for (task, metrics) in adapted {
        for (metric, v) in metrics {
            match base.and_then(|b| b.get(task)).and_then(|m| m.get(metric)) {
                Some(b) => {
                    let _ = writeln!(s, "| {task} | {metric} | {b:.4} | {v:.4} | {:+.4} |", v - b);
                }
                None if base.is_some() => {
                    let _ = writeln!(s, "| {task} | {metric} | – | {v:.4} | – |");
                }
                None => {
                    let _ = writeln!(s, "| {task} | {metric} | {v:.4} |");
                }
            }
        }
    }
    let _ = writeln!(
        s,
        "\n![Base and adapted model per task and metric, with ±stderr]({})",
        super::chart::CHART_FILE
    );
    s.push_str("\n## Comparable to\n\n");
    for t in suite.tasks.iter().filter(|t| adapted.contains_key(&t.name)) {
        let _ = writeln!(s, "- {}: {}", t.name, t.comparability());
    }
    let nc: Vec<String> = suite
        .tasks
        .iter()
        .filter(|t| t.non_commercial)
        .map(|t| format!("{} ({})", t.name, t.license))
        .collect();
    if !nc.is_empty() {
        let _ = writeln!(
            s,
            "\n**Non-commercial data:** {} — results are for research use only.",
            nc.join(", ")
        );
    }
    if !gates.is_empty() {
        s.push_str("\n## Gates\n\n");
        for g in gates {
            let _ = writeln!(
                s,
                "- {} {} {}: {}",
                g.task,
                g.metric,
                g.description,
                g.failure.as_deref().unwrap_or("passed")
            );
        }
    }
    s
}

/// Text for XML and HTML: the five markup characters escaped.
pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

/// JUnit XML: one test case per measured metric, failed where a gate on it failed.
pub fn junit(suite: &Suite, scores: &Scores, gates: &[GateOutcome]) -> String {
    let mut cases = String::new();
    let (mut tests, mut failures) = (0, 0);
    for (task, metrics) in scores {
        for (metric, v) in metrics {
            tests += 1;
            let failed: Vec<&GateOutcome> = gates
                .iter()
                .filter(|g| &g.task == task && &g.metric == metric && g.failure.is_some())
                .collect();
            let _ = write!(
                cases,
                "    <testcase classname=\"{}.{}\" name=\"{} = {v:.4}\">",
                xml_escape(&suite.name),
                xml_escape(task),
                xml_escape(metric)
            );
            if !failed.is_empty() {
                failures += 1;
                let msg = failed
                    .iter()
                    .filter_map(|g| g.failure.as_deref())
                    .collect::<Vec<_>>()
                    .join("; ");
                let _ = write!(cases, "<failure message=\"{}\"/>", xml_escape(&msg));
            }
            cases.push_str("</testcase>\n");
        }
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"{}\" tests=\"{tests}\" failures=\"{failures}\">\n{cases}  </testsuite>\n</testsuites>\n",
        xml_escape(&suite.name)
    )
}

/// Writes the per-sample records of each task as samples_<task>.jsonl.
pub fn write_samples(dir: &Path, results: &[TaskResult]) -> Result<()> {
    for r in results {
        let mut text = String::new();
        for s in &r.samples {
            text.push_str(&serde_json::to_string(s)?);
            text.push('\n');
        }
        write_atomic(
            &dir.join(format!("samples_{}.jsonl", r.name)),
            text.as_bytes(),
        )?;
    }
    Ok(())
}
