//! `feinschliff data inspect`: what was read, kept and dropped (and the chunks of each document,
//! with a warning for documents without text), token-length percentiles, truncation and packing,
//! and rendered samples with the trained part marked.

use anyhow::Result;
use std::fmt::Write as _;
use std::io::IsTerminal;

use super::encode::Encoded;
use super::{DataReport, SourceReport};
use crate::model::tokenizer_of;
use crate::recipe::Recipe;

/// Prepares the recipe's data with the base model's tokenizer and describes the result.
pub fn run(recipe: &Recipe, samples: usize) -> Result<String> {
    let tokenizer = tokenizer_of(&recipe.locate_base()?.dir)?;
    let prepared = super::prepare(recipe, &tokenizer)?;
    let marking = if std::io::stdout().is_terminal() {
        Marking::Colour
    } else {
        Marking::Brackets
    };
    let mut s = report_text(&prepared.report, recipe.data.max_seq_len);
    for (i, e) in prepared.preview.iter().take(samples).enumerate() {
        let trained = e.example.target_count();
        let _ = writeln!(
            s,
            "\n--- sample {} ({} tokens, {trained} trained{}) ---",
            i + 1,
            e.example.input_ids.len(),
            if marking == Marking::Brackets {
                ", trained text in [[ ]]"
            } else {
                ", trained text in green"
            }
        );
        let _ = writeln!(s, "{}", mark(e, marking));
    }
    Ok(s)
}

/// How the trained part of a sample is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marking {
    /// Green on a terminal.
    Colour,
    /// `[[` ... `]]` around trained text.
    Brackets,
}

/// The report as text.
pub fn report_text(r: &DataReport, max_seq_len: usize) -> String {
    let mut s = String::new();
    let mut sources = |title: &str, list: &[SourceReport]| {
        for src in list {
            let files = src
                .files
                .map(|n| format!("{n} file(s), "))
                .unwrap_or_default();
            let read = if src.documents.is_empty() {
                "rows read"
            } else if Some(src.documents.len()) == src.files {
                "chunks"
            } else {
                "rows and chunks read"
            };
            let _ = writeln!(
                s,
                "{title} {}: {files}{} {read}, {} samples kept",
                src.label, src.rows_read, src.samples
            );
            for doc in &src.documents {
                if doc.chunks == 0 {
                    let _ = writeln!(s, "    warning: {}", doc.no_text_warning());
                } else {
                    let pages = doc
                        .pages
                        .map(|p| format!("{p} page(s), "))
                        .unwrap_or_default();
                    let _ = writeln!(
                        s,
                        "    {}: {pages}{} chunk(s)",
                        doc.file.display(),
                        doc.chunks
                    );
                }
            }
            for (reason, n) in &src.dropped {
                let _ = writeln!(s, "    dropped {n}: {reason}");
            }
        }
    };
    sources("train", &r.train_sources);
    sources("validation", &r.validation_sources);
    let _ = writeln!(
        s,
        "samples: {} train, {} validation",
        r.train_samples, r.validation_samples
    );
    let _ = writeln!(
        s,
        "filtered: {} duplicates, {} shorter than min_tokens, {} longer than max_tokens, {} without trained tokens",
        r.duplicates_dropped, r.too_short, r.too_long, r.no_target
    );
    let (p50, p95, max) = percentiles(&r.lengths);
    let rate = if r.train_samples > 0 {
        100.0 * r.truncated as f64 / r.train_samples as f64
    } else {
        0.0
    };
    let _ = writeln!(s, "tokens per sample: p50 {p50}, p95 {p95}, max {max}");
    let _ = writeln!(
        s,
        "truncated to max_seq_len {max_seq_len}: {} samples ({rate:.1} %)",
        r.truncated
    );
    if let (Some(rows), Some(eff)) = (r.packed_rows, r.packing_efficiency) {
        let _ = writeln!(
            s,
            "packing: {rows} rows of {max_seq_len} tokens, {:.1} % filled",
            100.0 * eff
        );
    }
    s
}

/// p50, p95 and max of the lengths (nearest-rank).
pub fn percentiles(lengths: &[usize]) -> (usize, usize, usize) {
    if lengths.is_empty() {
        return (0, 0, 0);
    }
    let mut v = lengths.to_vec();
    v.sort_unstable();
    let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
    (rank(0.5), rank(0.95), v[v.len() - 1])
}

/// The sample's text with its trained spans marked.
pub fn mark(e: &Encoded, marking: Marking) -> String {
    let (open, close) = match marking {
        Marking::Colour => ("\x1b[32m", "\x1b[0m"),
        Marking::Brackets => ("[[", "]]"),
    };
    let mut out = String::with_capacity(e.text.len() + 16);
    let mut cursor = 0;
    let mut spans = e.trained.clone();
    spans.sort_by_key(|r| r.start);
    for span in spans {
        let (start, end) = (
            span.start.max(cursor).min(e.text.len()),
            span.end.min(e.text.len()),
        );
        if start >= end {
            continue;
        }
        out.push_str(&e.text[cursor..start]);
        out.push_str(open);
        out.push_str(&e.text[start..end]);
        out.push_str(close);
        cursor = end;
    }
    out.push_str(&e.text[cursor..]);
    out
}
