//! Perplexity over whole documents with lm-eval's rolling windows: word_perplexity,
//! byte_perplexity and bits_per_byte, aggregated as weighted sums over all documents.

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use serde_json::json;
use std::collections::BTreeMap;

use super::{Doc, TaskResult, Templates};
use crate::eval::metrics::{count_words, perplexities};
use crate::eval::scorer::{Scorer, TokenRequest};
use crate::eval::suite::TaskConfig;

pub fn run(
    task: &TaskConfig,
    docs: &[Doc],
    n_original: usize,
    scorer: &Scorer,
    bar: &ProgressBar,
) -> Result<TaskResult> {
    let templates = Templates::new(task)?;
    let mut texts = Vec::with_capacity(docs.len());
    let mut requests: Vec<TokenRequest> = Vec::new();
    let mut owners = Vec::new();
    for (i, doc) in docs.iter().enumerate() {
        let text = templates
            .render("context", doc)
            .with_context(|| format!("task `{}`, document {}", task.name, i + 1))?;
        let tokens = scorer.tok_encode(&text)?;
        for w in scorer.rolling_windows(&tokens) {
            requests.push(w);
            owners.push(i);
        }
        texts.push(text);
    }
    bar.set_length(requests.len() as u64);
    let scores = scorer.loglikelihood_tokens(&requests, bar)?;
    let mut per_doc = vec![0f64; texts.len()];
    for (owner, s) in owners.iter().zip(&scores) {
        per_doc[*owner] += s.logprob;
    }
    let (mut ll, mut words, mut bytes) = (0f64, 0usize, 0usize);
    let mut samples = Vec::new();
    for (i, (text, doc_ll)) in texts.iter().zip(&per_doc).enumerate() {
        let (w, b) = (count_words(text), text.len());
        ll += doc_ll;
        words += w;
        bytes += b;
        samples.push(json!({"doc_id": i, "loglikelihood": doc_ll, "words": w, "bytes": b}));
    }
    let (word, byte, bpb) = perplexities(ll, words, bytes);
    let wanted = task.metric_names();
    let metrics: BTreeMap<String, (f64, Option<f64>)> = [
        ("word_perplexity", word),
        ("byte_perplexity", byte),
        ("bits_per_byte", bpb),
    ]
    .into_iter()
    .filter(|(n, _)| wanted.iter().any(|m| m == n))
    .map(|(n, v)| (n.to_string(), (v, None)))
    .collect();
    Ok(TaskResult {
        name: task.name.clone(),
        metrics,
        samples,
        n_original,
        n_effective: docs.len(),
    })
}
