//! Documents for continued pre-training: `.pdf`, `.docx`, `.html`/`.htm` and `.md` files read into
//! headings and paragraphs (one reader per kind), which [`chunk`] joins into text samples of at most
//! `max_seq_len` tokens.

pub mod chunk;
mod docx;
mod html;
mod markdown;
mod pdf;

use anyhow::Result;
use std::path::{Path, PathBuf};

use super::source::ReadOptions;

/// The file kinds (extensions, or a source's `file_type`) read as documents.
pub const KINDS: &[&str] = &["pdf", "docx", "html", "htm", "md", "markdown"];

/// Whether files of `kind` (see [`super::source::file_kind`]) are documents.
pub fn is_document(kind: &str) -> bool {
    KINDS.contains(&kind)
}

/// One unit of a document in reading order: a heading, or a paragraph (a list, a table row, a code
/// block) of text without leading or trailing whitespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    pub text: String,
    pub heading: bool,
}

/// What a document file holds.
#[derive(Debug, Clone, Default)]
pub struct Document {
    pub blocks: Vec<Block>,
    /// PDFs: the number of pages.
    pub pages: Option<usize>,
}

/// What one document file gave, for `data inspect` and the run log.
#[derive(Debug, Clone)]
pub struct DocumentReport {
    pub file: PathBuf,
    pub pages: Option<usize>,
    pub chunks: usize,
}

impl DocumentReport {
    /// The warning for a file without text, naming it (and, for PDFs, the likely cause).
    pub fn no_text_warning(&self) -> String {
        let why = if self.pages.is_some() {
            " (a scanned PDF without a text layer? run OCR on it first, e.g. `ocrmypdf`)"
        } else {
            ""
        };
        format!("{} yielded no text{why}", self.file.display())
    }
}

/// Reads the headings and paragraphs of `path`, a document of `kind`; HTML and Markdown files are
/// decoded as the source's `encoding` says. Errors name the file (and, for PDFs, the page).
pub fn read(path: &Path, kind: &str, options: &ReadOptions) -> Result<Document> {
    Ok(match kind {
        "pdf" => pdf::read(path)?,
        "docx" => Document {
            blocks: docx::read(path)?,
            pages: None,
        },
        "html" | "htm" => Document {
            blocks: html::blocks(&super::source::decoded_text(path, options)?),
            pages: None,
        },
        _ => Document {
            blocks: markdown::blocks(&super::source::decoded_text(path, options)?),
            pages: None,
        },
    })
}

/// Adds `text` as a block unless it is blank; whitespace at its ends is dropped.
fn push_block(blocks: &mut Vec<Block>, text: &str, heading: bool) {
    let text = text.trim();
    if !text.is_empty() {
        blocks.push(Block {
            text: text.to_string(),
            heading,
        });
    }
}

/// Appends `text` to `out` with each run of ASCII whitespace as one space, as browsers show inline
/// text (a no-break space stays), never starting `out` or a line with a space.
fn push_collapsed(out: &mut String, text: &str) {
    for c in text.chars() {
        if c.is_ascii_whitespace() {
            if !(out.is_empty() || out.ends_with([' ', '\n'])) {
                out.push(' ');
            }
        } else {
            out.push(c);
        }
    }
}
