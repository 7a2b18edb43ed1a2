//! The data stage: sources → samples (format + column mapping) → rendered text with trained spans
//! → tokens and labels → filtered, split, packed examples. Entry point: [`prepare`].

pub mod batch;
pub mod encode;
pub mod excel;
pub mod format;
pub mod inspect;
mod locate;
pub mod pack;
pub mod source;
pub mod template;
pub mod text_encoding;

use anyhow::{bail, Result};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::model::ModelTokenizer;
use crate::progress::{Progress, Unit};
use crate::recipe::{Recipe, SourceSpec};
use encode::{Encoded, Encoder};
use format::{Drops, RowMapping, Sample};

pub use batch::{Batch, IGNORE_INDEX};

/// One training row: ids and labels of equal length (labels IGNORE_INDEX where no loss), made of
/// one sample or, when packed, several (`segments` are their lengths, in order).
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub segments: Vec<usize>,
}

impl Example {
    /// A single-sample example.
    pub fn single(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        let segments = vec![input_ids.len()];
        Self {
            input_ids,
            labels,
            segments,
        }
    }

    /// Number of tokens the loss is computed on (position i predicts label i+1).
    pub fn target_count(&self) -> usize {
        self.labels
            .iter()
            .skip(1)
            .filter(|&&l| l != IGNORE_INDEX)
            .count()
    }
}

/// Counts of one source, for the run log and `data inspect`.
#[derive(Debug, Clone, Default)]
pub struct SourceReport {
    pub label: String,
    pub files: usize,
    pub rows_read: usize,
    pub samples: usize,
    pub dropped: Drops,
}

/// What the data stage did, in numbers.
#[derive(Debug, Clone, Default)]
pub struct DataReport {
    pub train_sources: Vec<SourceReport>,
    pub validation_sources: Vec<SourceReport>,
    pub duplicates_dropped: usize,
    pub too_short: usize,
    pub too_long: usize,
    pub truncated: usize,
    pub no_target: usize,
    pub train_samples: usize,
    pub validation_samples: usize,
    /// Token counts of the training samples (after truncation), for percentiles.
    pub lengths: Vec<usize>,
    pub packed_rows: Option<usize>,
    pub packing_efficiency: Option<f64>,
}

/// A sample and where it was read from, for messages: the file and the row (1-based).
#[derive(Debug, Clone)]
struct Located {
    sample: Sample,
    file: Arc<Path>,
    row: usize,
}

/// What the data stage hands to training.
pub struct Prepared {
    pub train: Vec<Example>,
    pub validation: Vec<Example>,
    /// The first training samples as rendered, for inspection.
    pub preview: Vec<Encoded>,
    pub report: DataReport,
}

/// Reads, renders, tokenizes, masks, filters, splits and (optionally) packs the recipe's data.
pub fn prepare(recipe: &Recipe, tokenizer: &ModelTokenizer) -> Result<Prepared> {
    let d = &recipe.data;
    let seed = recipe.train.seed;
    let encoder = Encoder::new(tokenizer, &d.template, d.train_on_inputs)?;
    let mut report = DataReport::default();
    let mut seen = HashSet::new();

    let (train_sets, reports) =
        load_sources(recipe, &d.train, &mut seen, &mut report.duplicates_dropped)?;
    report.train_sources = reports;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train_sets, validation) = if d.validation.is_empty() {
        hold_out(train_sets, d.validation_fraction, &mut rng)
    } else {
        let (sets, reports) = load_sources(
            recipe,
            &d.validation,
            &mut seen,
            &mut report.duplicates_dropped,
        )?;
        report.validation_sources = reports;
        (train_sets, sets.into_iter().flatten().collect())
    };
    for (set, spec) in train_sets.iter_mut().zip(&d.train) {
        apply_weight(set, spec.weight, &mut rng);
    }
    let mut train: Vec<Located> = train_sets.into_iter().flatten().collect();
    train.shuffle(&mut rng);
    if let Some(max) = d.max_samples {
        train.truncate(max);
    }

    let encoded_train = encode_all(&encoder, &train, "tokenizing the training data")?;
    let encoded_validation = encode_all(&encoder, &validation, "tokenizing the validation data")?;
    let preview = encoded_train.iter().take(8).cloned().collect();
    let train = filter(encoded_train, recipe, &mut report);
    let mut ignored = DataReport::default();
    let validation = filter(encoded_validation, recipe, &mut ignored);
    report.lengths = train.iter().map(|e| e.input_ids.len()).collect();
    report.train_samples = train.len();
    report.validation_samples = validation.len();
    if train.is_empty() {
        bail!(
            "recipe {}: no training samples are left after filtering ({} rows read; see `feinschliff data inspect` for what was dropped and why)",
            recipe.source.display(),
            report.train_sources.iter().map(|s| s.rows_read).sum::<usize>()
        );
    }
    let (train, validation) = if d.packing {
        let rows = pack::pack(train, d.max_seq_len);
        report.packed_rows = Some(rows.len());
        report.packing_efficiency = Some(pack::efficiency(&rows, d.max_seq_len));
        (rows, pack::pack(validation, d.max_seq_len))
    } else {
        (train, validation)
    };
    Ok(Prepared {
        train,
        validation,
        preview,
        report,
    })
}

/// Reads each source into samples, dropping exact duplicates (across all sources) when asked.
fn load_sources(
    recipe: &Recipe,
    specs: &[SourceSpec],
    seen: &mut HashSet<Sample>,
    duplicates: &mut usize,
) -> Result<(Vec<Vec<Located>>, Vec<SourceReport>)> {
    let d = &recipe.data;
    let mut sets = Vec::new();
    let mut reports = Vec::new();
    for spec in specs {
        let mapping = RowMapping {
            format: spec.format.unwrap_or(d.format),
            columns: spec.columns.as_ref().unwrap_or(&d.columns),
            roles: &d.roles,
        };
        let mut r = SourceReport {
            label: spec.label(),
            ..Default::default()
        };
        let mut samples = Vec::new();
        for frame in source::read(recipe, spec)? {
            r.files += 1;
            r.rows_read += frame.frame.height();
            let file: Arc<Path> = frame.file.as_path().into();
            for (row, s) in mapping.samples(&frame.frame, &frame.file, &mut r.dropped)? {
                if d.dedup && !seen.insert(s.clone()) {
                    *duplicates += 1;
                    *r.dropped.entry("exact duplicate".into()).or_default() += 1;
                } else {
                    samples.push(Located {
                        sample: s,
                        file: file.clone(),
                        row: row + 1,
                    });
                }
            }
        }
        r.samples = samples.len();
        sets.push(samples);
        reports.push(r);
    }
    Ok((sets, reports))
}

/// Moves a seeded `fraction` of every source's samples to validation.
fn hold_out<T>(sets: Vec<Vec<T>>, fraction: f64, rng: &mut ChaCha8Rng) -> (Vec<Vec<T>>, Vec<T>) {
    let mut validation = Vec::new();
    let mut train = Vec::new();
    for mut set in sets {
        set.shuffle(rng);
        let n = if fraction > 0.0 && set.len() >= 2 {
            ((set.len() as f64 * fraction).round() as usize).clamp(1, set.len() - 1)
        } else {
            0
        };
        validation.extend(set.split_off(set.len() - n));
        train.push(set);
    }
    (train, validation)
}

/// Repeats (weight > 1) or subsamples (weight < 1) a source's samples; the fraction is drawn.
fn apply_weight<T: Clone>(set: &mut Vec<T>, weight: f64, rng: &mut ChaCha8Rng) {
    if weight == 1.0 {
        return;
    }
    let original = std::mem::take(set);
    let whole = weight.floor() as usize;
    for _ in 0..whole {
        set.extend(original.iter().cloned());
    }
    let fraction = weight - whole as f64;
    set.extend(
        original
            .into_iter()
            .filter(|_| rng.random::<f64>() < fraction),
    );
}

/// Renders and tokenizes in parallel, showing the progress as `what`; an error names the file
/// and row of the sample.
fn encode_all(encoder: &Encoder, samples: &[Located], what: &str) -> Result<Vec<Encoded>> {
    let progress = Progress::new(what, samples.len() as u64, Unit::Items("samples"));
    let encoded = samples
        .par_iter()
        .map(|s| {
            let e = encoder
                .encode(&s.sample)
                .map_err(|e| e.context(format!("{} row {}", s.file.display(), s.row)));
            progress.inc(1);
            e
        })
        .collect();
    progress.finish();
    encoded
}

/// Applies the length filters and truncation, counting what each did.
fn filter(encoded: Vec<Encoded>, recipe: &Recipe, report: &mut DataReport) -> Vec<Example> {
    let d = &recipe.data;
    let mut out = Vec::with_capacity(encoded.len());
    for e in encoded {
        let mut ex = e.example;
        let n = ex.input_ids.len();
        if n < d.min_tokens {
            report.too_short += 1;
            continue;
        }
        if d.max_tokens.is_some_and(|m| n > m) {
            report.too_long += 1;
            continue;
        }
        if n > d.max_seq_len {
            ex.input_ids.truncate(d.max_seq_len);
            ex.labels.truncate(d.max_seq_len);
            ex.segments = vec![d.max_seq_len];
            report.truncated += 1;
        }
        if ex.target_count() == 0 {
            report.no_target += 1;
            continue;
        }
        out.push(ex);
    }
    out
}
