//! Generation: greedy decoding until a stop string or max_gen_toks, scored by exact match and
//! SQuAD-style F1 against one or more references.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde_json::json;

use super::{Doc, Prompter, TaskResult, Templates};
use crate::eval::metrics::{exact_match, f1};
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
    let mut contexts = Vec::with_capacity(docs.len());
    let mut references = Vec::with_capacity(docs.len());
    for (i, doc) in docs.iter().enumerate() {
        let ctx = || format!("task `{}`, document {}", task.name, i + 1);
        contexts.push(prompter.context(doc, i).with_context(ctx)?);
        references.push(templates.targets(doc).with_context(ctx)?);
    }
    bar.set_length(docs.len() as u64);
    let outputs = scorer.generate(&contexts, &task.until, task.max_gen_toks, bar)?;
    let (mut em, mut f) = (Vec::new(), Vec::new());
    let mut samples = Vec::new();
    for (i, ((context, refs), out)) in contexts.iter().zip(&references).zip(&outputs).enumerate() {
        let prediction = out.trim();
        em.push(exact_match(prediction, refs));
        f.push(f1(prediction, refs));
        samples.push(json!({
            "doc_id": i, "context": context, "prediction": out, "references": refs,
            "exact_match": em[i], "f1": f[i],
        }));
    }
    Ok(TaskResult::from_means(
        task,
        [("exact_match", &em), ("f1", &f)],
        samples,
        n_original,
        docs.len(),
    ))
}
