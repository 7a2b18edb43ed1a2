//! Metric definitions as lm-evaluation-harness computes them: accuracy with the sample standard
//! error, answer comparisons (SQuAD's exact match and F1, a German-aware variant, lm-eval's
//! exact_match), and the perplexities.

use regex::Regex;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;

use super::functions::py_split;

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

/// How a generated answer is compared with its references (`answer_match` of a generate task).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnswerMatch {
    /// transformers' `squad_metrics` (SQuAD v1.1), as lm-eval's xquad and mlqa tasks score:
    /// lower case, ASCII punctuation removed, English articles removed, whitespace collapsed;
    /// exact_match and f1.
    Squad,
    /// SQuAD's comparison, German-aware (Feinschliff-native): German articles and typographic
    /// quotes and dashes are removed too; exact_match and f1.
    #[default]
    SquadDe,
    /// lm-eval's `exact_match` metric: the strings themselves, optionally compared without case
    /// (`ignore_case`) and ASCII punctuation (`ignore_punctuation`); exact_match only.
    Exact,
}

/// Options of [`AnswerMatch::Exact`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ExactOptions {
    pub ignore_case: bool,
    pub ignore_punctuation: bool,
}

impl AnswerMatch {
    /// The metrics this comparison defines.
    pub fn metrics(self) -> &'static [&'static str] {
        match self {
            AnswerMatch::Squad | AnswerMatch::SquadDe => &["exact_match", "f1"],
            AnswerMatch::Exact => &["exact_match"],
        }
    }

    /// `metric` (one of [`Self::metrics`]) of a prediction: the best over the references.
    pub fn score(
        self,
        metric: &str,
        prediction: &str,
        references: &[String],
        exact: ExactOptions,
    ) -> f64 {
        let one = |reference: &str| match (self, metric) {
            (AnswerMatch::Exact, _) => exact_match_strings(prediction, reference, exact),
            (_, "f1") => token_f1(&self.normalize(prediction), &self.normalize(reference)),
            _ => f64::from(u8::from(
                self.normalize(prediction) == self.normalize(reference),
            )),
        };
        references.iter().map(|r| one(r)).fold(0.0, f64::max)
    }

    fn normalize(self, s: &str) -> String {
        match self {
            AnswerMatch::SquadDe => normalize_answer_de(s),
            _ => normalize_answer_squad(s),
        }
    }
}

/// transformers' `squad_metrics.normalize_answer`: lower case, ASCII punctuation removed,
/// `\b(a|an|the)\b` replaced by a space, whitespace collapsed.
pub fn normalize_answer_squad(s: &str) -> String {
    static ARTICLES: LazyLock<Regex> =
        LazyLock::new(|| Regex::new(r"\b(a|an|the)\b").expect("valid regex"));
    let no_punct: String = s
        .to_lowercase()
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    py_split(&ARTICLES.replace_all(&no_punct, " "))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Articles removed by the German-aware normalisation: English (SQuAD) and German.
const ARTICLES_DE: &[&str] = &[
    "a", "an", "the", "der", "die", "das", "den", "dem", "des", "ein", "eine", "einer", "eines",
    "einem", "einen",
];

/// SQuAD normalisation, German-aware: lower case, punctuation removed, articles removed, whitespace collapsed.
pub fn normalize_answer_de(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punct: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation() && !"„“”‚‘’«»–—…".contains(*c))
        .collect();
    no_punct
        .split_whitespace()
        .filter(|w| !ARTICLES_DE.contains(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// lm-eval's `exact_match_hf_evaluate` for one pair: 1.0 when equal after the options (lower
/// case first, then ASCII punctuation removed).
pub fn exact_match_strings(prediction: &str, reference: &str, options: ExactOptions) -> f64 {
    let prepare = |s: &str| {
        let s = if options.ignore_case {
            s.to_lowercase()
        } else {
            s.to_string()
        };
        if options.ignore_punctuation {
            s.chars().filter(|c| !c.is_ascii_punctuation()).collect()
        } else {
            s
        }
    };
    f64::from(u8::from(prepare(prediction) == prepare(reference)))
}

/// SQuAD's token F1 of two normalised answers (`compute_f1`): 1 or 0 when either is empty.
fn token_f1(prediction: &str, reference: &str) -> f64 {
    let pt: Vec<&str> = py_split(prediction).collect();
    let rt: Vec<&str> = py_split(reference).collect();
    if pt.is_empty() || rt.is_empty() {
        return f64::from(u8::from(pt == rt));
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
