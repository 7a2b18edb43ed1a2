//! The data stage: sources → samples (format + column mapping, or a document's chunks) → rendered
//! text with trained spans → tokens and labels → filtered, split, packed examples. Entry point:
//! [`prepare`].

pub mod batch;
pub mod documents;
pub mod encode;
pub mod excel;
pub mod format;
pub mod inspect;
mod locate;
pub mod pack;
pub mod source;
pub mod sql;
pub mod template;
pub mod text_encoding;

use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::DataFrame;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use crate::model::ModelTokenizer;
use crate::progress::{Progress, Unit};
use crate::recipe::{source_name, DataFormat, Recipe, SourceSpec};
use documents::chunk::Chunker;
use documents::DocumentReport;
use encode::{Encoded, Encoder};
use format::{Drops, RowMapping, Sample};
use source::ReadOptions;

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
    /// Files read; None for an SQL source (one query).
    pub files: Option<usize>,
    /// Rows of tables and queries, chunks of documents.
    pub rows_read: usize,
    pub samples: usize,
    pub dropped: Drops,
    /// Per document file (.pdf, .docx, ...): its chunks.
    pub documents: Vec<DocumentReport>,
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

/// A sample and where it was read from, for messages: the file (or query) and the row (1-based;
/// for a document, its chunk).
#[derive(Debug, Clone)]
struct Located {
    sample: Sample,
    origin: Arc<str>,
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

    let (train_sets, reports) = load_sources(
        recipe,
        "train",
        tokenizer,
        &d.train,
        &mut seen,
        &mut report.duplicates_dropped,
    )?;
    report.train_sources = reports;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut train_sets, validation) = if d.validation.is_empty() {
        hold_out(train_sets, d.validation_fraction, &mut rng)
    } else {
        let (sets, reports) = load_sources(
            recipe,
            "validation",
            tokenizer,
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

/// Reads each source of `[[data.<table>]]` (`specs`) into samples, dropping exact duplicates
/// (across all sources) when asked. An error names the recipe and the source.
fn load_sources(
    recipe: &Recipe,
    table: &str,
    tokenizer: &ModelTokenizer,
    specs: &[SourceSpec],
    seen: &mut HashSet<Sample>,
    duplicates: &mut usize,
) -> Result<(Vec<Vec<Located>>, Vec<SourceReport>)> {
    let mut sets = Vec::new();
    let mut reports = Vec::new();
    for (i, spec) in specs.iter().enumerate() {
        let mut r = SourceReport {
            label: spec.label(),
            ..Default::default()
        };
        let samples =
            load_source(recipe, tokenizer, spec, &mut r, seen, duplicates).with_context(|| {
                format!(
                    "recipe {}: {} ({})",
                    recipe.source.display(),
                    source_name(table, i),
                    r.label
                )
            })?;
        r.samples = samples.len();
        sets.push(samples);
        reports.push(r);
    }
    Ok((sets, reports))
}

/// The samples of one source (its files, read in parallel, or its query), counted into its report.
fn load_source(
    recipe: &Recipe,
    tokenizer: &ModelTokenizer,
    spec: &SourceSpec,
    r: &mut SourceReport,
    seen: &mut HashSet<Sample>,
    duplicates: &mut usize,
) -> Result<Vec<Located>> {
    let d = &recipe.data;
    let mapping = RowMapping {
        format: spec.format.unwrap_or(d.format),
        columns: spec.columns.as_ref().unwrap_or(&d.columns),
        roles: &d.roles,
    };
    let read: Vec<Result<FileSamples>> = if spec.sql.is_some() {
        let frame = sql::read(recipe, spec)?;
        vec![table_samples(&frame, r.label.as_str().into(), &mapping)]
    } else {
        let found = source::files(recipe, spec)?;
        let options = &found.options;
        let has_documents = found
            .files
            .iter()
            .any(|f| documents::is_document(&source::file_kind(f, options.file_type.as_deref())));
        let chunker = has_documents
            .then(|| Chunker::new(tokenizer, d.max_seq_len, spec.chunk_overlap.unwrap_or(0)))
            .transpose()?;
        r.files = Some(found.files.len());
        found
            .files
            .par_iter()
            .map(|file| file_samples(file, options, &mapping, chunker.as_ref()))
            .collect()
    };
    let mut samples = Vec::new();
    for file in read {
        let file = file?;
        r.rows_read += file.rows;
        for (reason, n) in file.dropped {
            *r.dropped.entry(reason).or_default() += n;
        }
        if let Some(document) = file.document {
            if document.chunks == 0 {
                tracing::warn!("{}", document.no_text_warning());
            }
            r.documents.push(document);
        }
        for (row, sample) in file.samples {
            if d.dedup && !seen.insert(sample.clone()) {
                *duplicates += 1;
                *r.dropped.entry("exact duplicate".into()).or_default() += 1;
            } else {
                samples.push(Located {
                    sample,
                    origin: file.origin.clone(),
                    row: row + 1,
                });
            }
        }
    }
    Ok(samples)
}

/// What one file or query of a source gave.
struct FileSamples {
    /// The file, or the query's source label, for messages.
    origin: Arc<str>,
    /// Rows of a table or query, chunks of a document.
    rows: usize,
    /// Each with its row (0-based) in the table, or its chunk's index.
    samples: Vec<(usize, Sample)>,
    dropped: Drops,
    document: Option<DocumentReport>,
}

/// The samples of a table's rows through the format's mapping; `origin` (the file, the query)
/// names them in messages.
fn table_samples(frame: &DataFrame, origin: Arc<str>, mapping: &RowMapping) -> Result<FileSamples> {
    let mut dropped = Drops::new();
    let samples = mapping.samples(frame, &origin, &mut dropped)?;
    Ok(FileSamples {
        origin,
        rows: frame.height(),
        samples,
        dropped,
        document: None,
    })
}

/// The samples of one file: a table's rows through the format's mapping, or a document's chunks
/// as text samples.
fn file_samples(
    file: &Path,
    options: &ReadOptions,
    mapping: &RowMapping,
    chunker: Option<&Chunker>,
) -> Result<FileSamples> {
    let kind = source::file_kind(file, options.file_type.as_deref());
    let Some(chunker) = chunker.filter(|_| documents::is_document(&kind)) else {
        let frame = source::read_file(file, options)?;
        return table_samples(&frame, file.display().to_string().into(), mapping);
    };
    if mapping.format != DataFormat::Text {
        bail!(
            "{}: a document becomes text samples; set format = \"text\" on its source (or in [data])",
            file.display()
        );
    }
    let document = documents::read(file, &kind, options)?;
    let chunks = chunker
        .chunks(&document.blocks)
        .map_err(|e| anyhow!("{}: {e:#}", file.display()))?;
    Ok(FileSamples {
        origin: file.display().to_string().into(),
        rows: chunks.len(),
        document: Some(DocumentReport {
            file: file.to_path_buf(),
            pages: document.pages,
            chunks: chunks.len(),
        }),
        samples: chunks.into_iter().map(Sample::Text).enumerate().collect(),
        dropped: Drops::new(),
    })
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
                .map_err(|e| e.context(format!("{} row {}", s.origin, s.row)));
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
