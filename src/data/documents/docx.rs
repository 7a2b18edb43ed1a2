//! Word documents (.docx, Office Open XML; zip + quick-xml): the paragraphs of word/document.xml in
//! reading order, a paragraph a block (table cells included). A heading is a paragraph whose style
//! is named `heading N` or `Title` in word/styles.xml (German Word's `Überschrift 1` has the id
//! `berschrift1` and the name `heading 1`), or that sets an outline level, itself or through the
//! styles its style is based on. Tabs and line breaks stay; deleted text (tracked changes), field codes and the
//! fallback copies of text boxes are left out. Headers, footers and footnotes are other parts and
//! are not read.

use anyhow::{anyhow, Context, Result};
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;
use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use super::{push_block, Block};

const DOCUMENT: &str = "word/document.xml";
const STYLES: &str = "word/styles.xml";

/// The headings and paragraphs of the Word document `path`.
pub fn read(path: &Path) -> Result<Vec<Block>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|e| {
        anyhow!(
            "cannot read {} as a Word document (a .docx is a zip archive): {e}",
            path.display()
        )
    })?;
    let headings = match part(&mut zip, STYLES, path)? {
        Some(xml) => heading_styles(&xml)
            .map_err(|e| anyhow!("cannot read {}: {STYLES}: {e}", path.display()))?,
        None => HashSet::new(),
    };
    let document = part(&mut zip, DOCUMENT, path)?.ok_or_else(|| {
        anyhow!(
            "cannot read {}: it has no {DOCUMENT}, so it is not a Word document",
            path.display()
        )
    })?;
    paragraphs(&document, &headings)
        .map_err(|e| anyhow!("cannot read {}: {DOCUMENT}: {e}", path.display()))
}

/// The text of the zip entry `name`, if there is one.
fn part<R: std::io::Read + std::io::Seek>(
    zip: &mut zip::ZipArchive<R>,
    name: &str,
    path: &Path,
) -> Result<Option<String>> {
    let mut entry = match zip.by_name(name) {
        Ok(entry) => entry,
        Err(zip::result::ZipError::FileNotFound) => return Ok(None),
        Err(e) => return Err(anyhow!("cannot read {}: {name}: {e}", path.display())),
    };
    let mut text = String::new();
    entry
        .read_to_string(&mut text)
        .map_err(|e| anyhow!("cannot read {}: {name}: {e}", path.display()))?;
    Ok(Some(text))
}

/// The value of the attribute whose local name is `local` (`w:val` → `val`).
fn attr(e: &BytesStart, local: &str) -> Option<String> {
    e.attributes()
        .flatten()
        .find(|a| a.key.local_name().as_ref() == local)
        .map(|a| a.value.into_owned())
}

/// Whether an outline level (`w:outlineLvl`, 0 to 8; 9 is body text) makes a heading.
fn outline_heading(level: Option<String>) -> bool {
    level
        .and_then(|l| l.parse::<u8>().ok())
        .is_some_and(|l| l < 9)
}

/// A paragraph style of styles.xml.
#[derive(Default)]
struct Style {
    named_heading: bool,
    outline: bool,
    based_on: Option<String>,
}

/// The ids of the paragraph styles that make headings.
fn heading_styles(xml: &str) -> Result<HashSet<String>> {
    let mut styles: HashMap<String, Style> = HashMap::new();
    let mut current: Option<(String, Style)> = None;
    let mut reader = Reader::from_str(xml);
    loop {
        let event = next_event(&mut reader)?;
        match event {
            Event::Start(e) | Event::Empty(e) => match e.local_name().as_ref() {
                "style" => {
                    current = (attr(&e, "type").as_deref() == Some("paragraph"))
                        .then(|| attr(&e, "styleId"))
                        .flatten()
                        .map(|id| (id, Style::default()));
                }
                "name" => {
                    if let Some((_, s)) = &mut current {
                        let name = attr(&e, "val").unwrap_or_default().to_lowercase();
                        s.named_heading = name == "title" || name.starts_with("heading ");
                    }
                }
                "basedOn" => {
                    if let Some((_, s)) = &mut current {
                        s.based_on = attr(&e, "val");
                    }
                }
                "outlineLvl" => {
                    if let Some((_, s)) = &mut current {
                        s.outline = outline_heading(attr(&e, "val"));
                    }
                }
                _ => {}
            },
            Event::End(e) if e.local_name().as_ref() == "style" => {
                if let Some((id, s)) = current.take() {
                    styles.insert(id, s);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let heading = |id: &str| {
        let mut next = Some(id);
        // The `basedOn` chain, cut short should it loop.
        for _ in 0..styles.len() {
            let Some(s) = next.and_then(|id| styles.get(id)) else {
                break;
            };
            if s.outline {
                return true;
            }
            next = s.based_on.as_deref();
        }
        styles.get(id).is_some_and(|s| s.named_heading)
    };
    Ok(styles.keys().filter(|id| heading(id)).cloned().collect())
}

/// A paragraph being read.
#[derive(Default)]
struct Paragraph {
    text: String,
    heading: bool,
}

/// The paragraphs of document.xml; a paragraph inside another (a text box) comes first.
fn paragraphs(xml: &str, headings: &HashSet<String>) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let mut open: Vec<Paragraph> = Vec::new();
    let mut in_text = false;
    let mut in_properties = false;
    // Depth inside an element whose text is left out.
    let mut skipped = 0usize;
    let mut reader = Reader::from_str(xml);
    loop {
        let event = next_event(&mut reader)?;
        match event {
            Event::Start(_) if skipped > 0 => skipped += 1,
            Event::End(_) if skipped > 0 => skipped -= 1,
            _ if skipped > 0 => {}
            Event::Start(e) => match e.local_name().as_ref() {
                "p" => open.push(Paragraph::default()),
                "t" => in_text = true,
                "pPr" => in_properties = true,
                "delText" | "instrText" | "Fallback" => skipped = 1,
                _ => {}
            },
            Event::Empty(e) => {
                let Some(p) = open.last_mut() else { continue };
                match e.local_name().as_ref() {
                    "pStyle" if in_properties => {
                        p.heading |= attr(&e, "val").is_some_and(|id| headings.contains(&id))
                    }
                    "outlineLvl" if in_properties => p.heading |= outline_heading(attr(&e, "val")),
                    "tab" if !in_properties => p.text.push('\t'),
                    "br" | "cr" if !in_properties => p.text.push('\n'),
                    "noBreakHyphen" => p.text.push('-'),
                    _ => {}
                }
            }
            Event::Text(t) if in_text => {
                if let Some(p) = open.last_mut() {
                    p.text.push_str(&t.xml10_content());
                }
            }
            Event::GeneralRef(r) if in_text => {
                let entity = format!("&{};", r.as_ref());
                let text = quick_xml::escape::unescape(&entity)
                    .map_err(|e| anyhow!("at byte {}: {e}", reader.buffer_position()))?;
                if let Some(p) = open.last_mut() {
                    p.text.push_str(&text);
                }
            }
            Event::End(e) => match e.local_name().as_ref() {
                "t" => in_text = false,
                "pPr" => in_properties = false,
                "p" => {
                    if let Some(p) = open.pop() {
                        push_block(&mut blocks, &p.text, p.heading);
                    }
                }
                _ => {}
            },
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(blocks)
}

/// The next event of `reader`; an error names the byte where the XML breaks.
fn next_event<'a>(reader: &mut Reader<&'a [u8]>) -> Result<Event<'a>> {
    reader
        .read_event()
        .map_err(|e| anyhow!("XML error at byte {}: {e}", reader.error_position()))
}
