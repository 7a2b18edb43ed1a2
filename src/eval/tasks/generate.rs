//! Generation: greedy decoding until a stop string or max_gen_toks; each filter pipeline (or the
//! raw generation) is scored against the references with the task's `answer_match`.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde_json::{json, Map};

use super::{Doc, Prompter, TaskResult, Templates};
use crate::eval::scorer::Scorer;
use crate::eval::suite::{Suite, TaskConfig};

pub fn run(
    suite: &Suite,
    task: &TaskConfig,
    docs: &[Doc],
    n_original: usize,
    scorer: &Scorer,
    bar: &ProgressBar,
) -> Result<TaskResult> {
    let templates = Templates::new(task)?;
    let prompter = Prompter::new(suite, task, &templates, docs, &scorer.model.tokenizer)?;
    let pipelines = task
        .filters
        .iter()
        .map(|f| f.compiled())
        .collect::<Result<Vec<_>>>()?;
    let mut contexts = Vec::with_capacity(docs.len());
    let mut references = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        let ctx = || format!("task `{}`, document {}", task.name, i + 1);
        contexts.push(prompter.context(doc, i).with_context(ctx)?);
        references.push(templates.targets(doc).with_context(ctx)?);
    }
    bar.set_length(docs.len() as u64);
    let outputs = scorer.generate(&contexts, &task.until, task.max_gen_toks, bar)?;
    let metrics = task.base_metrics();
    let exact = task.exact_options();
    let mut per_doc: Vec<(String, Vec<f64>)> = Vec::new();
    let mut samples = Vec::with_capacity(docs.len());
    for (i, ((context, refs), out)) in contexts.iter().zip(&references).zip(&outputs).enumerate() {
        // The responses the metrics see: the raw generation, or one per filter pipeline.
        let responses: Vec<(Option<&str>, String)> = if pipelines.is_empty() {
            vec![(None, out.clone())]
        } else {
            pipelines
                .iter()
                .map(|p| (Some(p.name.as_str()), p.apply(out)))
                .collect()
        };
        let mut sample = Map::new();
        sample.insert("doc_id".into(), json!(i));
        sample.insert("context".into(), json!(context));
        sample.insert("prediction".into(), json!(out));
        sample.insert("references".into(), json!(refs));
        let mut filtered = Map::new();
        for (filter, response) in &responses {
            if let Some(name) = filter {
                filtered.insert(name.to_string(), json!(response));
            }
            for metric in &metrics {
                let key = match filter {
                    Some(name) => format!("{metric},{name}"),
                    None => metric.clone(),
                };
                let value = task.answer_match.score(metric, response, refs, exact);
                sample.insert(key.clone(), json!(value));
                match per_doc.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, values)) => values.push(value),
                    None => per_doc.push((key, vec![value])),
                }
            }
        }
        if !filtered.is_empty() {
            sample.insert("filtered".into(), filtered.into());
        }
        samples.push(sample.into());
    }
    Ok(TaskResult::from_means(
        task,
        per_doc,
        samples,
        n_original,
        docs.len(),
    ))
}
