//! Markdown documents (pulldown-cmark: CommonMark with tables, footnotes, task lists and front
//! matter): headings, paragraphs, a list as one block with an item a line, a table as one block
//! with a row a line and cells joined by ` | `, and code blocks as written. Front matter, raw HTML
//! and link targets are left out; link texts and image descriptions stay.

use pulldown_cmark::{Event, Options, Parser, Tag, TagEnd};

use super::{push_block, push_collapsed, Block};

/// The headings and paragraphs of Markdown `text`.
pub fn blocks(text: &str) -> Vec<Block> {
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS
        | Options::ENABLE_YAML_STYLE_METADATA_BLOCKS
        | Options::ENABLE_PLUSES_DELIMITED_METADATA_BLOCKS;
    let mut w = Writer::default();
    for event in Parser::new_ext(text, options) {
        match event {
            Event::Start(Tag::MetadataBlock(_)) => w.front_matter = true,
            Event::End(TagEnd::MetadataBlock(_)) => w.front_matter = false,
            _ if w.front_matter => {}
            Event::Start(Tag::Heading { .. }) => {
                w.flush();
                w.heading = true;
            }
            Event::End(TagEnd::Heading(_)) => {
                w.flush();
                w.heading = false;
            }
            Event::Start(Tag::List(first)) => {
                if w.lists.is_empty() {
                    w.flush();
                }
                w.lists.push(first);
            }
            Event::End(TagEnd::List(_)) => {
                w.lists.pop();
                if w.lists.is_empty() {
                    w.flush();
                }
            }
            Event::Start(Tag::Item) => w.item(),
            Event::TaskListMarker(done) => w.write(if done { "[x] " } else { "[ ] " }, true),
            Event::Start(Tag::CodeBlock(_)) => {
                w.block_or_line();
                w.code = true;
            }
            Event::End(TagEnd::CodeBlock) => {
                w.code = false;
                w.block_or_line();
            }
            Event::Start(Tag::Paragraph | Tag::Table(_) | Tag::FootnoteDefinition(_))
            | Event::End(TagEnd::Paragraph | TagEnd::Table | TagEnd::FootnoteDefinition)
            | Event::Rule => w.block_or_line(),
            Event::Start(Tag::TableHead | Tag::TableRow) => {
                w.new_line();
                w.cells = 0;
            }
            Event::Start(Tag::TableCell) => {
                if w.cells > 0 {
                    w.write(" | ", true);
                }
                w.cells += 1;
            }
            Event::Text(t) if w.code => w.write(&t, true),
            Event::Text(t) | Event::Code(t) | Event::InlineMath(t) | Event::DisplayMath(t) => {
                w.write(&t, false)
            }
            Event::SoftBreak => w.write(" ", false),
            Event::HardBreak => w.new_line(),
            _ => {}
        }
    }
    w.flush();
    w.blocks
}

/// The blocks so far and the one being written.
#[derive(Default)]
struct Writer {
    blocks: Vec<Block>,
    text: String,
    heading: bool,
    /// The open lists, innermost last: the next item's number, or None for bullets.
    lists: Vec<Option<u64>>,
    code: bool,
    front_matter: bool,
    /// Cells written in the current table row.
    cells: usize,
    /// A list item's bullet is written and nothing after it yet.
    bullet_only: bool,
}

impl Writer {
    fn flush(&mut self) {
        push_block(&mut self.blocks, &self.text, self.heading);
        self.text.clear();
        self.bullet_only = false;
    }

    /// Text as written (`raw`: code) or with whitespace collapsed.
    fn write(&mut self, text: &str, raw: bool) {
        if raw {
            self.text.push_str(text);
        } else {
            push_collapsed(&mut self.text, text);
        }
        self.bullet_only = false;
    }

    /// Ends the line, unless nothing follows a bullet yet (an item's first paragraph).
    fn new_line(&mut self) {
        if self.bullet_only {
            return;
        }
        self.text.truncate(self.text.trim_end_matches(' ').len());
        if !(self.text.is_empty() || self.text.ends_with('\n')) {
            self.text.push('\n');
        }
    }

    /// A block boundary; inside a list, only a new line (the list stays one block).
    fn block_or_line(&mut self) {
        if self.lists.is_empty() {
            self.flush();
        } else {
            self.new_line();
        }
    }

    /// A list item's line: indented by its depth, with its bullet or number.
    fn item(&mut self) {
        self.new_line();
        let depth = self.lists.len().saturating_sub(1);
        self.text.push_str(&"  ".repeat(depth));
        match self.lists.last_mut() {
            Some(Some(n)) => {
                self.text.push_str(&format!("{n}. "));
                *n += 1;
            }
            _ => self.text.push_str("- "),
        }
        self.bullet_only = true;
    }
}
