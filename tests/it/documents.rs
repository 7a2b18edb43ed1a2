//! Document sources for continued pre-training, on files written here in their producers'
//! formats: a two-page PDF (lopdf, Helvetica in WinAnsiEncoding, compressed content streams), a
//! Word .docx (a real OOXML zip with styles.xml, German Word's heading style ids, runs split inside
//! words, a tracked deletion and a field code), an HTML page with navigation boilerplate and a
//! Markdown file with front matter. Checks: umlauts byte for byte, headings, boilerplate gone,
//! chunks within max_seq_len with the overlap, a PDF without a text layer reported, and bad files
//! named (PDFs with the page).

use feinschliff::data::documents::chunk::Chunker;
use feinschliff::data::documents::{self, Block, Document};
use feinschliff::data::encode::Encoder;
use feinschliff::data::format::Sample;
use feinschliff::data::source::ReadOptions;
use feinschliff::model::ModelTokenizer;
use lopdf::content::{Content, Operation};
use lopdf::{dictionary, Object, Stream, StringFormat};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::common::tiny_llama_dir;
use super::data::{prepare, tokenizer};

const FEE: &str =
    "Die Grundgebühr beträgt 12,50 € im Monat; für Großkunden gilt ein ermäßigter Satz.";
const HOURS: &str =
    "Öffnungszeiten: Montag bis Freitag. Über die Hotline erreichen Sie uns schnell.";

fn read(path: &Path) -> anyhow::Result<Document> {
    let kind = path.extension().unwrap().to_str().unwrap().to_string();
    documents::read(path, &kind, &ReadOptions::default())
}

fn heading(text: &str) -> Block {
    Block {
        text: text.into(),
        heading: true,
    }
}

fn para(text: &str) -> Block {
    Block {
        text: text.into(),
        heading: false,
    }
}

/// One line of a PDF page: text, font size, and the baseline's height from the page's bottom.
type Line<'a> = (&'a str, i64, i64);

/// A PDF as a word processor writes it: one Helvetica font in WinAnsiEncoding, a page per entry,
/// each line shown at its place, streams Flate-compressed. A page given as `None` is damaged: it
/// shows text in a font it does not have; an empty page gets an image over the page, as a scanner
/// writes it.
fn write_pdf(path: &Path, pages: &[Option<&[Line]>]) {
    let mut doc = lopdf::Document::with_version("1.7");
    let pages_id = doc.new_object_id();
    let font = doc.add_object(dictionary! {
        "Type" => "Font",
        "Subtype" => "Type1",
        "BaseFont" => "Helvetica",
        "Encoding" => "WinAnsiEncoding",
    });
    let scan = doc.add_object(Stream::new(
        dictionary! {
            "Type" => "XObject",
            "Subtype" => "Image",
            "Width" => 2,
            "Height" => 2,
            "ColorSpace" => "DeviceGray",
            "BitsPerComponent" => 8,
        },
        vec![0, 128, 255, 64],
    ));
    let resources = doc.add_object(dictionary! {
        "Font" => dictionary! { "F1" => font },
        "XObject" => dictionary! { "Scan" => scan },
    });
    let mut kids = Vec::new();
    for page in pages {
        let content = match page {
            Some([]) => Content {
                operations: vec![
                    Operation::new("q", vec![]),
                    Operation::new(
                        "cm",
                        vec![
                            595.into(),
                            0.into(),
                            0.into(),
                            842.into(),
                            0.into(),
                            0.into(),
                        ],
                    ),
                    Operation::new("Do", vec!["Scan".into()]),
                    Operation::new("Q", vec![]),
                ],
            }
            .encode()
            .unwrap(),
            Some(lines) => {
                let mut operations = Vec::new();
                for &(text, size, y) in lines.iter() {
                    let (bytes, _, unmappable) = encoding_rs::WINDOWS_1252.encode(text);
                    assert!(!unmappable, "{text} is not WinAnsi");
                    operations.extend([
                        Operation::new("BT", vec![]),
                        Operation::new("Tf", vec!["F1".into(), size.into()]),
                        Operation::new("Td", vec![72.into(), y.into()]),
                        Operation::new(
                            "Tj",
                            vec![Object::String(bytes.into_owned(), StringFormat::Literal)],
                        ),
                        Operation::new("ET", vec![]),
                    ]);
                }
                Content { operations }.encode().unwrap()
            }
            // A font the page's resources do not have.
            None => b"BT /F9 12 Tf 72 700 Td (kaputt) Tj ET".to_vec(),
        };
        let contents = doc.add_object(Stream::new(dictionary! {}, content));
        kids.push(Object::from(doc.add_object(dictionary! {
            "Type" => "Page",
            "Parent" => pages_id,
            "Contents" => contents,
            "Resources" => resources,
            "MediaBox" => vec![0.into(), 0.into(), 595.into(), 842.into()],
        })));
    }
    let count = kids.len() as i64;
    doc.objects.insert(
        pages_id,
        Object::Dictionary(dictionary! { "Type" => "Pages", "Kids" => kids, "Count" => count }),
    );
    let catalog = doc.add_object(dictionary! { "Type" => "Catalog", "Pages" => pages_id });
    doc.trailer.set("Root", catalog);
    doc.compress();
    doc.save(path).unwrap();
}

/// The handbook: a heading and two paragraphs (the first over two lines) on page 1, a heading
/// and a paragraph on page 2.
const PAGE_1: &[Line] = &[
    ("Handbuch Kundenservice", 20, 760),
    ("Die Grundgebühr beträgt 12,50 € im Monat;", 11, 720),
    ("für Großkunden gilt ein ermäßigter Satz.", 11, 706),
    (HOURS, 11, 680),
];
const PAGE_2: &[Line] = &[
    ("Häufige Fragen", 20, 760),
    (
        "Wie ändere ich mein Passwort? Über das Kundenportal.",
        11,
        720,
    ),
];

#[test]
fn pdf_text_layer_reads_with_umlauts_headings_and_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handbuch.pdf");
    write_pdf(&path, &[Some(PAGE_1), Some(PAGE_2)]);
    let doc = read(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(doc.pages, Some(2));
    assert_eq!(
        doc.blocks,
        [
            heading("Handbuch Kundenservice"),
            para(FEE),
            para(HOURS),
            heading("Häufige Fragen"),
            para("Wie ändere ich mein Passwort? Über das Kundenportal."),
        ]
    );
    // Byte for byte, not only equal after some normalisation.
    assert_eq!(doc.blocks[1].text.as_bytes(), FEE.as_bytes());
}

#[test]
fn pdf_without_text_layer_and_bad_pdfs() {
    let dir = tempfile::tempdir().unwrap();
    let scan = dir.path().join("scan.pdf");
    write_pdf(&scan, &[Some(&[]), Some(&[])]);
    let doc = read(&scan).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!((doc.pages, doc.blocks.len()), (Some(2), 0));

    let broken_page = dir.path().join("seite2.pdf");
    write_pdf(&broken_page, &[Some(PAGE_1), None]);
    let err = format!("{:#}", read(&broken_page).unwrap_err());
    assert!(
        err.contains("seite2.pdf") && err.contains("page 2") && !err.contains("page 1"),
        "{err}"
    );

    let corrupt = dir.path().join("kaputt.pdf");
    std::fs::write(&corrupt, b"%PDF-1.7\nnur der Anfang einer Datei").unwrap();
    let err = format!("{:#}", read(&corrupt).unwrap_err());
    assert!(err.contains("kaputt.pdf") && err.contains("PDF"), "{err}");
}

/// A .docx as Word writes it (Deflate-compressed parts, German style ids) with `body` as the
/// paragraphs of word/document.xml.
fn write_docx(path: &Path, body: &str) {
    let mut zip = ::zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let deflated = ::zip::write::SimpleFileOptions::default()
        .compression_method(::zip::CompressionMethod::Deflated);
    let w = r#"xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main" xmlns:mc="http://schemas.openxmlformats.org/markup-compatibility/2006""#;
    let parts = [
        ("[Content_Types].xml", r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types"><Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/><Default Extension="xml" ContentType="application/xml"/><Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.document.main+xml"/><Override PartName="/word/styles.xml" ContentType="application/vnd.openxmlformats-officedocument.wordprocessingml.styles+xml"/></Types>"#.to_string()),
        ("_rels/.rels", r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/officeDocument" Target="word/document.xml"/></Relationships>"#.to_string()),
        ("word/_rels/document.xml.rels", r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships"><Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/relationships/styles" Target="styles.xml"/></Relationships>"#.to_string()),
        ("word/styles.xml", format!(r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:styles {w}><w:style w:type="paragraph" w:default="1" w:styleId="Standard"><w:name w:val="Normal"/></w:style><w:style w:type="paragraph" w:styleId="Titel"><w:name w:val="Title"/><w:basedOn w:val="Standard"/></w:style><w:style w:type="paragraph" w:styleId="berschrift1"><w:name w:val="heading 1"/><w:basedOn w:val="Standard"/><w:pPr><w:outlineLvl w:val="0"/></w:pPr></w:style><w:style w:type="paragraph" w:customStyle="1" w:styleId="KapitelHaupt"><w:name w:val="Kapitel Haupt"/><w:basedOn w:val="berschrift1"/></w:style><w:style w:type="paragraph" w:styleId="Listenabsatz"><w:name w:val="List Paragraph"/><w:basedOn w:val="Standard"/></w:style></w:styles>"#)),
        ("word/document.xml", format!(r#"<?xml version="1.0" encoding="UTF-8" standalone="yes"?>
<w:document {w}><w:body>{body}<w:sectPr><w:pgSz w:w="11906" w:h="16838"/></w:sectPr></w:body></w:document>"#)),
    ];
    for (name, text) in parts {
        zip.start_file(name, deflated).unwrap();
        zip.write_all(text.as_bytes()).unwrap();
    }
    zip.finish().unwrap();
}

fn p(style: Option<&str>, runs: &str) -> String {
    let style = style
        .map(|s| format!(r#"<w:pPr><w:pStyle w:val="{s}"/><w:tabs><w:tab w:val="left" w:pos="720"/></w:tabs></w:pPr>"#))
        .unwrap_or_default();
    format!("<w:p>{style}{runs}</w:p>")
}

fn r(text: &str) -> String {
    format!(r#"<w:r><w:rPr><w:b/></w:rPr><w:t xml:space="preserve">{text}</w:t></w:r>"#)
}

#[test]
fn docx_paragraphs_and_headings_from_styles() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handbuch.docx");
    let body = [
        p(Some("Titel"), &r("Handbuch Kundenservice")),
        p(Some("berschrift1"), &r("Gebühren")),
        // Word splits runs anywhere, also inside words; a deletion and a field code are not text.
        p(
            Some("Standard"),
            &[
                r("Die Grundge"),
                r("bühr beträgt 12,50 € im Monat; "),
                r#"<w:del w:id="1" w:author="A"><w:r><w:delText>nicht mehr gültig </w:delText></w:r></w:del>"#.into(),
                r("für Großkunden gilt ein ermäßigter Satz."),
                r#"<w:r><w:fldChar w:fldCharType="begin"/></w:r><w:r><w:instrText xml:space="preserve"> PAGE </w:instrText></w:r><w:r><w:fldChar w:fldCharType="end"/></w:r>"#.into(),
            ]
            .concat(),
        ),
        p(Some("KapitelHaupt"), &r("Öffnungszeiten &amp; Kontakt")),
        p(None, &[r("Telefon:"), "<w:r><w:tab/></w:r>".into(), r("0800 123")].concat()),
        "<w:tbl><w:tr><w:tc><w:p><w:r><w:t>Zelle Ä</w:t></w:r></w:p></w:tc><w:tc><w:p><w:r><w:t>Zelle ß</w:t></w:r></w:p></w:tc></w:tr></w:tbl>".into(),
        r#"<w:p><w:pPr><w:outlineLvl w:val="1"/></w:pPr><w:r><w:t>Direkt gegliedert</w:t></w:r></w:p>"#.into(),
        p(Some("Listenabsatz"), &[r("Zeile eins"), "<w:r><w:br/></w:r>".into(), r("Zeile zwei")].concat()),
        "<w:p/>".into(),
    ]
    .concat();
    write_docx(&path, &body);
    let doc = read(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        doc.blocks,
        [
            heading("Handbuch Kundenservice"),
            heading("Gebühren"),
            para(FEE),
            heading("Öffnungszeiten & Kontakt"),
            para("Telefon:\t0800 123"),
            para("Zelle Ä"),
            para("Zelle ß"),
            heading("Direkt gegliedert"),
            para("Zeile eins\nZeile zwei"),
        ]
    );
    assert_eq!(doc.blocks[2].text.as_bytes(), FEE.as_bytes());
}

const PAGE: &str = r#"<!DOCTYPE html>
<html lang="de"><head><meta charset="utf-8"><title>Hilfe – Beispiel GmbH</title>
<style>body { font-family: sans-serif } .menü { display: none }</style>
<script>var menü = "Navigation öffnen";</script></head>
<body>
<header class="site"><a href="/">Beispiel GmbH</a><nav><ul><li><a href="/produkte">Produkte</a></li><li><a href="/preise">Preise</a></li></ul></nav></header>
<div role="navigation">Sie sind hier: Start › Hilfe</div>
<main>
<article>
<header><h1>Gebühren &amp; Zahlungen</h1></header>
<p>Die Grundgebühr beträgt 12,50&nbsp;€ im Monat;
   für   Großkunden gilt ein <strong>ermäßigter</strong> Satz.</p>
<h2>Öffnungszeiten</h2>
<p>Montag bis Freitag.<br>Über die Hotline erreichen Sie uns schnell.</p>
<ul><li>Telefon</li><li>E-Mail</li></ul>
<table><tr><th>Tarif</th><th>Preis</th></tr><tr><td>Basis</td><td>12,50 €</td></tr></table>
<pre>Code   bleibt
  wie er ist</pre>
<div hidden>Versteckter Hinweis</div>
</article>
<aside>Das könnte Sie auch interessieren</aside>
</main>
<footer>© 2024 Beispiel GmbH · Impressum · Datenschutz</footer>
<script>console.log("Tracking")</script>
</body></html>"#;

#[test]
fn html_keeps_the_article_and_drops_navigation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("hilfe.html");
    std::fs::write(&path, PAGE).unwrap();
    let doc = read(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        doc.blocks,
        [
            heading("Gebühren & Zahlungen"),
            para("Die Grundgebühr beträgt 12,50\u{a0}€ im Monat; für Großkunden gilt ein ermäßigter Satz."),
            heading("Öffnungszeiten"),
            para("Montag bis Freitag.\nÜber die Hotline erreichen Sie uns schnell."),
            para("- Telefon\n- E-Mail"),
            para("Tarif | Preis\nBasis | 12,50 €"),
            para("Code   bleibt\n  wie er ist"),
        ]
    );
    // Without <main>, the page's body is read, still without its header, navigation and footer.
    let no_main = dir.path().join("ohne-main.htm");
    std::fs::write(&no_main, PAGE.replace("<main>", "").replace("</main>", "")).unwrap();
    let text: Vec<String> = read(&no_main)
        .unwrap()
        .blocks
        .into_iter()
        .map(|b| b.text)
        .collect();
    let all = text.join("\n");
    assert!(
        all.contains("Gebühren & Zahlungen") && all.contains("Hotline"),
        "{all}"
    );
    for boilerplate in [
        "Produkte",
        "Sie sind hier",
        "Impressum",
        "könnte Sie",
        "Navigation öffnen",
        "Tracking",
        "font-family",
        "Versteckter",
        "Hilfe – Beispiel",
    ] {
        assert!(!all.contains(boilerplate), "`{boilerplate}` in {all}");
    }
}

const MARKDOWN: &str = "---
title: Handbuch
tags: [intern]
---

# Gebühren

Die Grundgebühr beträgt 12,50 € im Monat;
für Großkunden gilt ein *ermäßigter* Satz.

Öffnungszeiten
--------------

- Montag bis Freitag
- Über die [Hotline](https://example.com/hotline)
  1. Telefon
  2. E-Mail

```
Code   bleibt
```

| Tarif | Preis |
|-------|-------|
| Basis | 12,50 € |

<div class=\"hinweis\">Rohes HTML</div>
";

#[test]
fn markdown_headings_lists_code_and_tables() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handbuch.md");
    std::fs::write(&path, MARKDOWN).unwrap();
    let doc = read(&path).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        doc.blocks,
        [
            heading("Gebühren"),
            para(FEE),
            heading("Öffnungszeiten"),
            para("- Montag bis Freitag\n- Über die Hotline\n  1. Telefon\n  2. E-Mail"),
            para("Code   bleibt"),
            para("Tarif | Preis\nBasis | 12,50 €"),
        ]
    );
    assert_eq!(doc.blocks[1].text.as_bytes(), FEE.as_bytes());
}

/// Sentences of about 12 tokens each, numbered so no two are alike.
fn sentences(topic: &str, n: usize) -> String {
    (1..=n)
        .map(|i| format!("Satz {i} über {topic} erklärt die Gebühren für Kunden."))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A handbook with sections of short paragraphs, a title directly over a heading, a paragraph
/// longer than a chunk, and a sentence longer than a chunk.
fn long_document() -> Vec<Block> {
    let long_sentence = (0..60)
        .map(|i| format!("wort{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    vec![
        heading("Handbuch"),
        heading("Gebühren"),
        para(&sentences("Preise", 2)),
        para(&sentences("Rabatte", 2)),
        para(&sentences("Mahnungen", 2)),
        para(&sentences("Zahlungen", 12)),
        heading("Öffnungszeiten"),
        para(&sentences("Zeiten", 1)),
        para(&long_sentence),
        heading("Kontakt"),
        para(&sentences("Telefon", 1)),
    ]
}

/// The text of the last `n` tokens of `text`, from the first word that starts among them.
fn last_tokens(tok: &ModelTokenizer, text: &str, n: usize) -> String {
    let offsets = tok.encoding(text).unwrap().get_offsets().to_vec();
    let start = offsets[offsets.len().saturating_sub(n)].0;
    let rest = &text[start..];
    match text[..start].chars().last() {
        Some(c) if !c.is_whitespace() => {
            let next = rest.find(char::is_whitespace).unwrap_or(rest.len());
            rest[next..].trim_start().to_string()
        }
        _ => rest.trim_start().to_string(),
    }
}

fn squeeze(text: &str) -> String {
    text.split_whitespace().collect()
}

#[test]
fn chunks_fit_max_seq_len_and_overlap() {
    let tok = tokenizer();
    let encoder = Encoder::new(&tok, "chatml", false).unwrap();
    let blocks = long_document();
    let (max_seq_len, overlap) = (64, 8);
    let chunks = Chunker::new(&tok, max_seq_len, overlap)
        .unwrap()
        .chunks(&blocks)
        .unwrap();
    assert!(chunks.len() >= 6, "{chunks:#?}");
    let mut overlapped = 0;
    let mut rebuilt = String::new();
    for (i, chunk) in chunks.iter().enumerate() {
        // The sample as training sees it, with BOS and EOS, fits.
        let sample = encoder.encode(&Sample::Text(chunk.clone())).unwrap();
        let n = sample.example.input_ids.len();
        assert!(n <= max_seq_len, "chunk {i} has {n} tokens: {chunk}");
        let starts_section = blocks
            .iter()
            .any(|b| b.heading && chunk.starts_with(&b.text));
        let mut new_text = chunk.as_str();
        if i > 0 && !starts_section {
            let tail = last_tokens(&tok, &chunks[i - 1], overlap);
            assert!(
                chunk.starts_with(&tail),
                "chunk {i} does not start with the last {overlap} tokens of chunk {} (`{tail}`): {chunk}",
                i - 1
            );
            let tail_tokens = tok.encoding(&tail).unwrap().len();
            assert!(tail_tokens <= overlap + 1, "{tail_tokens} tokens: `{tail}`");
            new_text = &chunk[tail.len()..];
            overlapped += usize::from(tail_tokens >= overlap / 2);
        }
        rebuilt.push_str(new_text);
    }
    assert!(overlapped >= 3, "{chunks:#?}");
    // Nothing lost, nothing repeated beyond the overlaps.
    let original: String = blocks.iter().map(|b| squeeze(&b.text)).collect();
    assert_eq!(squeeze(&rebuilt), original);
    // Every heading after body text starts a chunk; the title stays with the heading under it.
    for h in ["Handbuch\n\nGebühren", "Öffnungszeiten", "Kontakt"] {
        assert!(
            chunks.iter().any(|c| c.starts_with(h)),
            "`{h}`: {chunks:#?}"
        );
    }
}

#[test]
fn long_paragraphs_split_at_sentences_then_tokens() {
    let tok = tokenizer();
    let chunker = Chunker::new(&tok, 48, 0).unwrap();
    let paragraph = sentences("Zahlungen", 12);
    let chunks = chunker.chunks(&[para(&paragraph)]).unwrap();
    assert!(chunks.len() >= 3, "{chunks:#?}");
    for c in &chunks {
        assert!(
            c.starts_with("Satz ") && c.ends_with("Kunden."),
            "not cut at a sentence end: {c}"
        );
    }
    assert_eq!(chunks.join(" "), paragraph);

    let long_sentence = (0..80)
        .map(|i| format!("wort{i}"))
        .collect::<Vec<_>>()
        .join(" ");
    let chunks = chunker.chunks(&[para(&long_sentence)]).unwrap();
    assert!(chunks.len() >= 3, "{chunks:#?}");
    assert_eq!(squeeze(&chunks.concat()), squeeze(&long_sentence));

    // No room for text after the special tokens and the overlap.
    let err = Chunker::new(&tok, 2, 1)
        .err()
        .expect("too small")
        .to_string();
    assert!(err.contains("max_seq_len 2"), "{err}");
}

/// The four kinds and a scan in one folder, read through a recipe's glob.
fn document_folder(dir: &Path) -> PathBuf {
    let docs = dir.join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    write_pdf(&docs.join("handbuch.pdf"), &[Some(PAGE_1), Some(PAGE_2)]);
    write_pdf(&docs.join("scan.pdf"), &[Some(&[])]);
    write_docx(
        &docs.join("brief.docx"),
        &[p(Some("berschrift1"), &r("Brief")), p(None, &r(HOURS))].concat(),
    );
    std::fs::write(docs.join("hilfe.html"), PAGE).unwrap();
    std::fs::write(docs.join("handbuch.md"), MARKDOWN).unwrap();
    docs
}

const RECIPE_DATA: &str = "format = \"text\"\nmax_seq_len = 40\ndedup = false\n[[data.train]]\npath = \"docs/*\"\nchunk_overlap = 6";

#[test]
fn documents_flow_into_text_samples_with_a_report() {
    let dir = tempfile::tempdir().unwrap();
    document_folder(dir.path());
    let p = prepare(dir.path(), RECIPE_DATA).unwrap_or_else(|e| panic!("{e:#}"));
    let src = &p.report.train_sources[0];
    assert_eq!(src.files, Some(5));
    let chunks: Vec<(String, usize)> = src
        .documents
        .iter()
        .map(|d| {
            (
                d.file.file_name().unwrap().to_string_lossy().into(),
                d.chunks,
            )
        })
        .collect();
    let count = |name: &str| chunks.iter().find(|(n, _)| n == name).unwrap().1;
    assert_eq!(count("scan.pdf"), 0, "{chunks:?}");
    for name in ["handbuch.pdf", "brief.docx", "hilfe.html", "handbuch.md"] {
        assert!(count(name) >= 1, "{chunks:?}");
    }
    assert_eq!(src.rows_read, chunks.iter().map(|(_, n)| n).sum::<usize>());
    assert_eq!(p.report.truncated, 0);
    assert!(p.train.iter().all(|e| e.input_ids.len() <= 40));
    let tok = tokenizer();
    let texts: Vec<String> = p
        .train
        .iter()
        .map(|e| tok.decode(&e.input_ids).unwrap())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Großkunden gilt ein ermäßigter Satz.")),
        "{texts:#?}"
    );

    let report = feinschliff::data::inspect::report_text(&p.report, 40);
    assert!(
        report.contains("warning: ") && report.contains("scan.pdf yielded no text (a scanned PDF"),
        "{report}"
    );
    assert!(report.contains("handbuch.pdf: 2 page(s), "), "{report}");
}

#[test]
fn data_inspect_lists_chunks_per_document() {
    let dir = tempfile::tempdir().unwrap();
    document_folder(dir.path());
    let recipe = dir.path().join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\nbase = \"{}\"\n[data]\nvalidation_fraction = 0.0\n{RECIPE_DATA}\n[output]\ndir = \"out\"\n",
            tiny_llama_dir().display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["data", "inspect"])
        .arg(&recipe)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for line in [
        "brief.docx: 1 chunk(s)",
        "hilfe.html: ",
        "handbuch.md: ",
        "scan.pdf yielded no text",
    ] {
        assert!(stdout.contains(line), "`{line}` missing: {stdout}");
    }

    // A corrupt document stops it, naming the file.
    std::fs::write(dir.path().join("docs/kaputt.docx"), b"PK\x03\x04 kein Zip").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args(["data", "inspect"])
        .arg(&recipe)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("kaputt.docx") && err.contains("Word"), "{err}");
}

#[test]
fn bad_documents_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let no_document = d.join("leer.docx");
    let mut zip = ::zip::ZipWriter::new(std::fs::File::create(&no_document).unwrap());
    zip.start_file(
        "word/styles.xml",
        ::zip::write::SimpleFileOptions::default(),
    )
    .unwrap();
    zip.write_all(b"<w:styles/>").unwrap();
    zip.finish().unwrap();
    let err = format!("{:#}", read(&no_document).unwrap_err());
    assert!(
        err.contains("leer.docx") && err.contains("word/document.xml"),
        "{err}"
    );

    let bad_xml = d.join("xml.docx");
    write_docx(&bad_xml, "<w:p><w:r><w:t>offen</w:r></w:p>");
    let err = format!("{:#}", read(&bad_xml).unwrap_err());
    assert!(
        err.contains("xml.docx") && err.contains("word/document.xml"),
        "{err}"
    );

    let latin = d.join("alt.html");
    std::fs::write(&latin, b"<p>Gr\xfc\xdfe</p>").unwrap();
    let err = format!("{:#}", read(&latin).unwrap_err());
    assert!(err.contains("alt.html") && err.contains("UTF-8"), "{err}");
    let windows = documents::read(
        &latin,
        "html",
        &ReadOptions {
            encoding: Some("windows-1252".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(windows.blocks, [para("Grüße")]);

    // A document in a chat source, and chunk_overlap on a chat source.
    std::fs::write(d.join("a.md"), "# Titel\n\nText.").unwrap();
    let err = format!(
        "{:#}",
        prepare(d, "format = \"chat\"\n[[data.train]]\npath = \"a.md\"")
            .err()
            .unwrap()
    );
    assert!(
        err.contains("a.md") && err.contains("format = \"text\""),
        "{err}"
    );
    let recipe = d.join("recipe.toml");
    std::fs::write(
        &recipe,
        format!(
            "[model]\nbase = \"{}\"\n[data]\n[[data.train]]\npath = \"a.md\"\nchunk_overlap = 4\n[output]\ndir = \"out\"\n",
            tiny_llama_dir().display()
        ),
    )
    .unwrap();
    let err = format!(
        "{:#}",
        feinschliff::recipe::Recipe::load(&recipe, &[])
            .err()
            .unwrap()
    );
    assert!(
        err.contains("chunk_overlap") && err.contains("`chat`"),
        "{err}"
    );
    let text = std::fs::read_to_string(&recipe)
        .unwrap()
        .replace("[data]", "[data]\nformat = \"text\"\nmax_seq_len = 64")
        .replace("chunk_overlap = 4", "chunk_overlap = 33");
    std::fs::write(&recipe, text).unwrap();
    let err = format!(
        "{:#}",
        feinschliff::recipe::Recipe::load(&recipe, &[])
            .err()
            .unwrap()
    );
    assert!(
        err.contains("chunk_overlap") && err.contains("more than half"),
        "{err}"
    );

    // Documents are no table: an eval suite or mirror that names one is told so.
    let err = format!(
        "{:#}",
        feinschliff::data::source::read_file(&d.join("a.md"), &ReadOptions::default()).unwrap_err()
    );
    assert!(err.contains("a.md") && err.contains("documents"), "{err}");
}
