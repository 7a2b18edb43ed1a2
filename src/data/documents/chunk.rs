//! A document's blocks → text samples of at most `max_seq_len` tokens, counted with the model's
//! tokenizer together with the special tokens a text sample gets (BOS, EOS). Blocks are joined by
//! blank lines. A heading starts a new chunk, unless the chunk so far holds only headings. A block
//! that does not fit into the current chunk starts the next one when it fits there whole; else it is
//! split at sentence ends (Unicode's sentence boundaries), and a sentence longer than a chunk at
//! token boundaries. A chunk cut inside a section begins with the last `chunk_overlap` tokens of
//! the chunk before, from the first word that starts among them; a chunk that begins a section
//! does not.

use anyhow::{bail, Result};
use unicode_segmentation::UnicodeSegmentation;

use super::Block;
use crate::data::encode::text_specials;
use crate::model::ModelTokenizer;

/// Splits documents into chunks for one tokenizer, sequence length and overlap.
pub struct Chunker<'a> {
    tokenizer: &'a ModelTokenizer,
    /// Tokens of text a chunk may hold.
    budget: usize,
    overlap: usize,
}

impl<'a> Chunker<'a> {
    /// A chunker for samples of `max_seq_len` tokens whose chunks overlap by `overlap` tokens;
    /// an error when the special tokens and the overlap leave no room for text.
    pub fn new(tokenizer: &'a ModelTokenizer, max_seq_len: usize, overlap: usize) -> Result<Self> {
        let (prefix, suffix) = text_specials(tokenizer);
        let specials = prefix.len() + suffix.len();
        match max_seq_len.checked_sub(specials) {
            Some(budget) if budget > overlap => Ok(Self {
                tokenizer,
                budget,
                overlap,
            }),
            _ => bail!(
                "max_seq_len {max_seq_len} leaves no room for document text: a text sample gets {specials} special tokens, and chunk_overlap is {overlap} tokens"
            ),
        }
    }

    /// The chunks of a document's blocks, in order.
    pub fn chunks(&self, blocks: &[Block]) -> Result<Vec<String>> {
        let mut c = Chunks {
            chunker: self,
            done: Vec::new(),
            text: String::new(),
            fill: Fill::Empty,
        };
        for block in blocks {
            if block.heading {
                c.new_section();
            }
            c.place_block(&block.text, block.heading)?;
        }
        c.finish();
        Ok(c.done)
    }

    fn fits(&self, text: &str) -> Result<bool> {
        Ok(self.tokenizer.encoding(text)?.len() <= self.budget)
    }
}

/// What the chunk being written holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    Empty,
    /// Only the overlap taken from the chunk before.
    Overlap,
    /// Only headings.
    Headings,
    Body,
}

/// The chunks of one document as they are written.
struct Chunks<'c, 'a> {
    chunker: &'c Chunker<'a>,
    done: Vec<String>,
    /// The chunk being written: no whitespace at either end.
    text: String,
    fill: Fill,
}

impl Chunks<'_, '_> {
    /// The chunk with `unit` appended after `sep` (dropped at the start of a chunk).
    fn joined(&self, sep: &str, unit: &str) -> String {
        if self.text.is_empty() {
            unit.to_string()
        } else {
            format!("{}{sep}{unit}", self.text)
        }
    }

    fn set(&mut self, text: String, heading: bool) {
        self.text = text;
        if !heading {
            self.fill = Fill::Body;
        } else if self.fill != Fill::Body {
            self.fill = Fill::Headings;
        }
    }

    /// Appends `unit` when it fits into this chunk or, when this one holds body text, when it fits
    /// whole into the next (which then starts with the overlap).
    fn try_place(&mut self, sep: &str, unit: &str, heading: bool) -> Result<bool> {
        let here = self.joined(sep, unit);
        if self.chunker.fits(&here)? {
            self.set(here, heading);
            return Ok(true);
        }
        if self.fill == Fill::Body {
            let tail = self.tail()?;
            let next = if tail.is_empty() {
                unit.to_string()
            } else {
                format!("{tail}{sep}{unit}")
            };
            if self.chunker.fits(&next)? {
                self.done.push(std::mem::take(&mut self.text));
                self.fill = Fill::Overlap;
                self.set(next, heading);
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn place_block(&mut self, text: &str, heading: bool) -> Result<()> {
        if self.try_place("\n\n", text, heading)? {
            return Ok(());
        }
        for (sep, sentence) in units(text.split_sentence_bounds(), "\n\n") {
            if !self.try_place(sep, sentence, heading)? {
                self.place_tokens(sep, sentence, heading)?;
            }
        }
        Ok(())
    }

    /// Fills chunks with `text` cut at token boundaries.
    fn place_tokens(&mut self, sep: &str, text: &str, heading: bool) -> Result<()> {
        let encoding = self.chunker.tokenizer.encoding(text)?;
        // Token starts, moved past whitespace: a piece never begins with any.
        let mut cuts: Vec<usize> = encoding
            .get_offsets()
            .iter()
            .filter(|&&(start, _)| text.is_char_boundary(start))
            .map(|&(start, _)| start + (text[start..].len() - text[start..].trim_start().len()))
            .filter(|&c| c > 0 && c < text.len())
            .collect();
        cuts.dedup();
        let mut pieces = Vec::with_capacity(cuts.len() + 1);
        let mut from = 0;
        for cut in cuts.into_iter().chain([text.len()]) {
            if cut > from {
                pieces.push(&text[from..cut]);
                from = cut;
            }
        }
        let mut sep = sep.to_string();
        let mut rest = &pieces[..];
        while !rest.is_empty() {
            // The most pieces that fit after the chunk so far (at least one into an empty chunk).
            let (mut lo, mut hi) = (0, rest.len());
            while lo < hi {
                let mid = (lo + hi).div_ceil(2);
                if self
                    .chunker
                    .fits(&self.joined(&sep, rest[..mid].concat().trim_end()))?
                {
                    lo = mid;
                } else {
                    hi = mid - 1;
                }
            }
            let take = if lo == 0 && self.fill == Fill::Empty {
                1
            } else {
                lo
            };
            if take > 0 {
                let piece = rest[..take].concat();
                let here = self.joined(&sep, piece.trim_end());
                self.set(here, heading);
                sep = piece[piece.trim_end().len()..].to_string();
                rest = &rest[take..];
            }
            if !rest.is_empty() {
                self.cut()?;
            }
        }
        Ok(())
    }

    /// The overlap: the chunk's last `overlap` tokens, from the first word that starts among them.
    fn tail(&self) -> Result<String> {
        if self.chunker.overlap == 0 {
            return Ok(String::new());
        }
        let text = &self.text;
        let offsets = self
            .chunker
            .tokenizer
            .encoding(text)?
            .get_offsets()
            .to_vec();
        let start = offsets
            .len()
            .checked_sub(self.chunker.overlap)
            .and_then(|i| offsets.get(i))
            .map_or(0, |&(start, _)| start);
        let word = (start..text.len())
            .find(|&i| {
                text.is_char_boundary(i)
                    && (i == 0 || text[..i].ends_with(char::is_whitespace))
                    && !text[i..].starts_with(char::is_whitespace)
            })
            .unwrap_or(text.len());
        Ok(text[word..].to_string())
    }

    /// Ends the chunk inside a section: the next one starts with the overlap.
    fn cut(&mut self) -> Result<()> {
        match self.fill {
            Fill::Body | Fill::Headings => {
                let tail = self.tail()?;
                self.done.push(std::mem::replace(&mut self.text, tail));
                self.fill = if self.text.is_empty() {
                    Fill::Empty
                } else {
                    Fill::Overlap
                };
            }
            Fill::Empty | Fill::Overlap => {
                self.text.clear();
                self.fill = Fill::Empty;
            }
        }
        Ok(())
    }

    /// A heading: the chunk so far ends (without overlap) unless it holds only headings.
    fn new_section(&mut self) {
        match self.fill {
            Fill::Body => self.finish(),
            Fill::Overlap => {
                self.text.clear();
                self.fill = Fill::Empty;
            }
            Fill::Empty | Fill::Headings => {}
        }
    }

    /// Ends the chunk at a section's end: the next one starts without overlap.
    fn finish(&mut self) {
        if matches!(self.fill, Fill::Body | Fill::Headings) {
            self.done.push(std::mem::take(&mut self.text));
        }
        self.text.clear();
        self.fill = Fill::Empty;
    }
}

/// Pieces of text (each with the whitespace around it) as units without surrounding whitespace,
/// each with the whitespace before it; the first with `first_sep`.
fn units<'t>(pieces: impl Iterator<Item = &'t str>, first_sep: &'t str) -> Vec<(&'t str, &'t str)> {
    let mut out = Vec::new();
    let mut pending: Option<&str> = Some(first_sep);
    let mut trailing = "";
    for piece in pieces {
        let body = piece.trim();
        if body.is_empty() {
            continue;
        }
        let lead = &piece[..piece.len() - piece.trim_start().len()];
        let sep = match pending.take() {
            Some(first) => first,
            None if trailing.is_empty() => lead,
            None => trailing,
        };
        out.push((sep, body));
        trailing = &piece[piece.trim_end().len()..];
    }
    out
}
