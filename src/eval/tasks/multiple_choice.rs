//! Multiple choice by log-likelihood: each choice is scored as `target_delimiter + choice` after
//! the context; acc picks the highest sum, acc_norm the highest sum per character of the choice.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde_json::json;

use super::{gold_index, Doc, Prompter, TaskResult, Templates};
use crate::eval::metrics::argmax;
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
    let mut items = Vec::with_capacity(docs.len());
    let mut pairs = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let ctx = || format!("task `{}`, document {}", task.name, i + 1);
        let context = prompter.context(doc, i).with_context(ctx)?;
        let choices = templates.choices(task, doc).with_context(ctx)?;
        let gold = gold_index(&templates.targets(doc).with_context(ctx)?[0], &choices)
            .with_context(ctx)?;
        for c in &choices {
            pairs.push((context.clone(), format!("{}{c}", task.target_delimiter)));
        }
        items.push((context, choices, gold));
    }
    bar.set_length(pairs.len() as u64);
    let scores = scorer.loglikelihood(&pairs, bar)?;
    let (mut acc, mut acc_norm, mut samples) = (Vec::new(), Vec::new(), Vec::new());
    let mut offset = 0;
    for (i, (context, choices, gold)) in items.into_iter().enumerate() {
        let lls: Vec<f64> = scores[offset..offset + choices.len()]
            .iter()
            .map(|s| s.logprob)
            .collect();
        let greedy: Vec<bool> = scores[offset..offset + choices.len()]
            .iter()
            .map(|s| s.is_greedy)
            .collect();
        offset += choices.len();
        let normed: Vec<f64> = lls
            .iter()
            .zip(&choices)
            .map(|(ll, c)| ll / c.chars().count() as f64)
            .collect();
        let pred = argmax(&lls);
        let pred_norm = argmax(&normed);
        acc.push(f64::from(u8::from(pred == gold)));
        acc_norm.push(f64::from(u8::from(pred_norm == gold)));
        samples.push(json!({
            "doc_id": i,
            "context": context,
            "choices": choices,
            "loglikelihoods": lls,
            "is_greedy": greedy,
            "prediction": pred,
            "prediction_norm": pred_norm,
            "gold": gold,
            "acc": acc[i],
            "acc_norm": acc_norm[i],
        }));
    }
    Ok(TaskResult::from_means(
        task,
        vec![("acc".into(), acc), ("acc_norm".into(), acc_norm)],
        samples,
        n_original,
        docs.len(),
    ))
}
