//! PDF documents (pdf-extract over lopdf): the text layer, page by page. Glyphs join into lines by
//! their positions as pdf-extract's plain-text output joins them (a space where the gap to the
//! previous glyph is wider than a tenth of the font size, a new line where the text moves down by
//! more than half of it); a move down by more than 1.5 font sizes ends a paragraph, and a paragraph
//! of at most 200 characters set at least 15 % larger than the body text (the size most characters
//! have) is a heading. The lines of a paragraph are joined with spaces. Encrypted files are read
//! with the empty password, as viewers open them, or refused.

use anyhow::{anyhow, Result};
use pdf_extract::{MediaBox, OutputDev, OutputError, Transform};
use std::collections::BTreeMap;
use std::path::Path;

use super::{push_block, Block, Document};
use crate::failure::caught;

/// Paragraphs this much larger than the body text are headings.
const HEADING_SCALE: f64 = 1.15;
/// Longer paragraphs are never headings.
const HEADING_MAX_CHARS: usize = 200;

/// The headings and paragraphs of the PDF `path`; errors name the file and the page.
pub fn read(path: &Path) -> Result<Document> {
    let bytes = std::fs::read(path).map_err(|e| anyhow!("cannot read {}: {e}", path.display()))?;
    let not_pdf = |e: anyhow::Error| anyhow!("cannot read {} as PDF: {e:#}", path.display());
    let mut doc = caught(|| pdf_extract::Document::load_mem(&bytes))
        .map_err(not_pdf)?
        .map_err(|e| not_pdf(e.into()))?;
    if doc.is_encrypted() {
        doc.decrypt("").map_err(|e| {
            anyhow!(
                "cannot read {}: the PDF is encrypted with a password ({e}); save a copy without one (e.g. `qpdf --decrypt`)",
                path.display()
            )
        })?;
    }
    let pages = doc.get_pages();
    let mut paragraphs = Vec::new();
    for (&number, &id) in &pages {
        let failed = |why: String| anyhow!("cannot read {} page {number}: {why}", path.display());
        doc.get_and_decode_page_content(id)
            .map_err(|e| failed(format!("its content stream is damaged ({e})")))?;
        let mut glyphs = Glyphs::default();
        caught(|| pdf_extract::output_doc_page(&doc, &mut glyphs, number))
            .map_err(|e| failed(format!("text extraction failed: {e}")))?
            .map_err(|e| failed(format!("text extraction failed: {e}")))?;
        paragraphs.extend(glyphs.paragraphs());
    }
    let body = body_size(&paragraphs);
    let mut blocks: Vec<Block> = Vec::new();
    for p in &paragraphs {
        let heading = p.size >= body * HEADING_SCALE && p.text.chars().count() <= HEADING_MAX_CHARS;
        push_block(&mut blocks, &p.text, heading);
    }
    Ok(Document {
        blocks,
        pages: Some(pages.len()),
    })
}

/// One glyph as placed on the page: y grows downwards, sizes in page units.
struct Glyph {
    x: f64,
    y: f64,
    /// Where the glyph ends on x.
    end: f64,
    size: f64,
    text: String,
    /// The first glyph of a string the page shows.
    starts_word: bool,
}

/// A paragraph with the mean font size of its characters.
struct Paragraph {
    text: String,
    size: f64,
    chars: usize,
}

/// The glyphs of one page, in the order the page draws them.
#[derive(Default)]
struct Glyphs {
    glyphs: Vec<Glyph>,
    starts_word: bool,
}

impl OutputDev for Glyphs {
    fn begin_page(
        &mut self,
        _page: u32,
        _media_box: &MediaBox,
        _art_box: Option<(f64, f64, f64, f64)>,
    ) -> Result<(), OutputError> {
        Ok(())
    }

    fn end_page(&mut self) -> Result<(), OutputError> {
        Ok(())
    }

    fn output_character(
        &mut self,
        trm: &Transform,
        width: f64,
        _spacing: f64,
        font_size: f64,
        char: &str,
    ) -> Result<(), OutputError> {
        // The font size through the text rendering matrix, as pdf-extract's text output takes it.
        let (sx, sy) = (
            font_size * (trm.m11 + trm.m21),
            font_size * (trm.m12 + trm.m22),
        );
        let size = (sx * sy).abs().sqrt();
        self.glyphs.push(Glyph {
            x: trm.m31,
            y: -trm.m32,
            end: trm.m31 + width * size,
            size,
            text: char.to_string(),
            starts_word: std::mem::take(&mut self.starts_word),
        });
        Ok(())
    }

    fn begin_word(&mut self) -> Result<(), OutputError> {
        self.starts_word = true;
        Ok(())
    }

    fn end_word(&mut self) -> Result<(), OutputError> {
        Ok(())
    }

    fn end_line(&mut self) -> Result<(), OutputError> {
        Ok(())
    }
}

impl Glyphs {
    /// The page's paragraphs, from the glyphs' positions.
    fn paragraphs(&self) -> Vec<Paragraph> {
        let mut out = Vec::new();
        let mut current = Paragraph {
            text: String::new(),
            size: 0.0,
            chars: 0,
        };
        let mut last: Option<&Glyph> = None;
        for g in &self.glyphs {
            if let (Some(prev), true) = (last, g.starts_word) {
                let down = (g.y - prev.y).abs();
                if down > g.size * 1.5 {
                    out.push(std::mem::replace(
                        &mut current,
                        Paragraph {
                            text: String::new(),
                            size: 0.0,
                            chars: 0,
                        },
                    ));
                } else if down > g.size * 0.5 || g.x > prev.end + g.size * 0.1 {
                    push_space(&mut current.text);
                }
            }
            if g.text.trim().is_empty() {
                push_space(&mut current.text);
            } else {
                current.text.push_str(&g.text);
                current.size += g.size;
                current.chars += 1;
            }
            last = Some(g);
        }
        out.push(current);
        out.retain(|p| p.chars > 0);
        for p in &mut out {
            p.size /= p.chars as f64;
        }
        out
    }
}

/// A space, unless the text is empty or ends with one.
fn push_space(text: &mut String) {
    if !(text.is_empty() || text.ends_with(' ')) {
        text.push(' ');
    }
}

/// The font size most characters have (to a tenth of a unit).
fn body_size(paragraphs: &[Paragraph]) -> f64 {
    let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
    for p in paragraphs {
        *counts.entry((p.size * 10.0).round() as i64).or_default() += p.chars;
    }
    counts
        .into_iter()
        .max_by_key(|&(_, n)| n)
        .map_or(0.0, |(size, _)| size as f64 / 10.0)
}
