//! Metric definitions as lm-evaluation-harness computes them: accuracy with the sample standard
//! error, SQuAD-style exact match and F1 (with German articles removed), and the perplexities.

/// Mean of the values.
pub fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.iter().sum::<f64>() / values.len() as f64
}

/// Standard error of the mean with the sample standard deviation (n − 1), as lm-eval's mean_stderr.
pub fn mean_stderr(values: &[f64]) -> f64 {
    let n = values.len();
    if n < 2 {
        return f64::NAN;
    }
    let m = mean(values);
    let var = values.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (n - 1) as f64;
    (var / n as f64).sqrt()
}

/// Index of the largest value; the first one wins ties (numpy's argmax).
pub fn argmax(values: &[f64]) -> usize {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best
}

/// Articles removed by the normalisation: English (SQuAD) and German.
const ARTICLES: &[&str] = &[
    "a", "an", "the", "der", "die", "das", "den", "dem", "des", "ein", "eine", "einer", "eines",
    "einem", "einen",
];

/// SQuAD normalisation, German-aware: lower case, punctuation removed, articles removed, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation() && !"„“”‚‘’«»–—…".contains(*c))
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !ARTICLES.contains(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// 1.0 when the normalised prediction equals a normalised reference.
pub fn exact_match(prediction: &str, references: &[String]) -> f64 {
    let p = normalize_answer(prediction);
    if references.iter().any(|r| normalize_answer(r) == p) {
        1.0
    } else {
        0.0
    }
}

/// The best token-overlap F1 of the prediction against the references (SQuAD).
pub fn f1(prediction: &str, references: &[String]) -> f64 {
    references
        .iter()
        .map(|r| f1_single(prediction, r))
        .fold(0.0, f64::max)
}

fn f1_single(prediction: &str, reference: &str) -> f64 {
    let p = normalize_answer(prediction);
    let r = normalize_answer(reference);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let rt: Vec<&str> = r.split_whitespace().collect();
    if pt.is_empty() || rt.is_empty() {
        return if pt == rt { 1.0 } else { 0.0 };
    }
    let mut counts = std::collections::HashMap::new();
    for t in &rt {
        *counts.entry(*t).or_insert(0i64) += 1;
    }
    let mut common = 0;
    for t in &pt {
        if let Some(c) = counts.get_mut(t) {
            if *c > 0 {
                *c -= 1;
                common += 1;
            }
        }
    }
    if common == 0 {
        return 0.0;
    }
    let precision = common as f64 / pt.len() as f64;
    let recall = common as f64 / rt.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// Words of a document as lm-eval counts them for word_perplexity (`re.split(r"\s+", doc)`).
pub fn count_words(doc: &str) -> usize {
    let re = regex::Regex::new(r"\s+").map(|re| re.split(doc).count());
    re.unwrap_or(0)
}

/// word_perplexity, byte_perplexity and bits_per_byte from summed log-likelihoods, words and bytes.
pub fn perplexities(loglikelihood: f64, words: usize, bytes: usize) -> (f64, f64, f64) {
    let word = (-loglikelihood / words as f64).exp();
    let byte = (-loglikelihood / bytes as f64).exp();
    let bpb = -loglikelihood / bytes as f64 / std::f64::consts::LN_2;
    (word, byte, bpb)
}
