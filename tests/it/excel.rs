//! Workbook sources: real .xlsx (written with rust_xlsxwriter) and .ods (written by hand as
//! LibreOffice lays it out) read back: umlauts byte for byte, values as Excel shows them, merged
//! cells, empty rows, sheet and header_row, and every bad input named by file, sheet and row.

use feinschliff::data::excel::SheetRef;
use feinschliff::data::source::{read_file, ReadOptions};
use polars::prelude::*;
use rust_xlsxwriter::{ExcelDateTime, Format, Formula, Workbook};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::data::{prepare, tokenizer};

const ANSWER: &str = "Sie beträgt 12,50 € im Monat – für Maß und Öl.";

/// A workbook: a cover sheet, then `FAQ` (a merged title row, the header in row 2, a category
/// merged down two rows, an empty row, numbers, dates and booleans), then sheets with bad input.
fn workbook(dir: &Path) -> PathBuf {
    let mut book = Workbook::new();
    let date = Format::new().set_num_format("yyyy-mm-dd");
    let stamp = Format::new().set_num_format("dd.mm.yyyy hh:mm");
    let plain = Format::new();

    let cover = book.add_worksheet().set_name("Deckblatt").unwrap();
    cover.write_string(0, 0, "Nur ein Deckblatt").unwrap();

    let faq = book.add_worksheet().set_name("FAQ").unwrap();
    faq.merge_range(0, 0, 0, 5, "FAQ-Export Kundenservice", &plain)
        .unwrap();
    for (c, title) in ["Kategorie", "Frage", "Antwort", "Betrag", "Datum", "Aktiv"]
        .iter()
        .enumerate()
    {
        faq.write_string(1, c as u16, *title).unwrap();
    }
    faq.merge_range(2, 0, 3, 0, "Gebühren", &plain).unwrap();
    faq.write_string(2, 1, "Wie hoch ist die Grundgebühr?")
        .unwrap();
    faq.write_string(2, 2, ANSWER).unwrap();
    faq.write_number(2, 3, 12.0).unwrap();
    let day = ExcelDateTime::from_ymd(2024, 3, 1).unwrap();
    faq.write_datetime_with_format(2, 4, &day, &date).unwrap();
    faq.write_boolean(2, 5, true).unwrap();
    faq.write_string(3, 1, "Gibt es Rabatt?").unwrap();
    faq.write_string(3, 2, "Ja, für Jahreszahler.").unwrap();
    faq.write_number_with_format(3, 3, 12.5, &Format::new().set_num_format("0.00"))
        .unwrap();
    let time = ExcelDateTime::from_ymd(2024, 3, 1)
        .unwrap()
        .and_hms(10, 30, 0)
        .unwrap();
    faq.write_datetime_with_format(3, 4, &time, &stamp).unwrap();
    faq.write_boolean(3, 5, false).unwrap();
    // Row 5 stays empty.
    faq.write_string(5, 0, "Büro").unwrap();
    faq.write_string(5, 1, "Wo ist das Büro?").unwrap();
    faq.write_string(5, 2, "An der Großen Straße 3.").unwrap();
    faq.write_number_with_format(5, 3, 0.125, &Format::new().set_num_format("0.0%"))
        .unwrap();
    faq.write_number(5, 4, 12.5).unwrap();

    let broken = book.add_worksheet().set_name("Fehler").unwrap();
    broken.write_string(0, 0, "Frage").unwrap();
    broken.write_string(0, 1, "Antwort").unwrap();
    broken.write_string(1, 0, "Was kostet es?").unwrap();
    broken.write_string(1, 1, "Nichts.").unwrap();
    broken.write_string(2, 0, "Wie viel pro Tag?").unwrap();
    broken
        .write_formula(2, 1, Formula::new("=1/0").set_result("#DIV/0!"))
        .unwrap();

    let twice = book.add_worksheet().set_name("Doppelt").unwrap();
    twice.write_string(0, 0, "Frage").unwrap();
    twice.write_string(0, 1, "Antwort").unwrap();
    twice.write_string(0, 2, "Frage").unwrap();
    twice.write_string(1, 0, "x").unwrap();

    let path = dir.join("faq.xlsx");
    book.save(&path).unwrap();
    path
}

fn read(
    path: &Path,
    sheet: Option<SheetRef>,
    header_row: Option<u32>,
) -> anyhow::Result<DataFrame> {
    let options = ReadOptions {
        sheet,
        header_row,
        ..Default::default()
    };
    read_file(path, &options)
}

fn column(df: &DataFrame, name: &str) -> Vec<Option<String>> {
    df.column(name)
        .unwrap_or_else(|e| panic!("{e}: {df}"))
        .str()
        .unwrap()
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

fn some(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
}

#[test]
fn xlsx_cells_read_as_excel_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = workbook(dir.path());
    let by_name = read(&path, Some(SheetRef::Name("FAQ".into())), Some(2)).unwrap();
    let by_index = read(&path, Some(SheetRef::Index(1)), Some(2)).unwrap();
    assert!(by_name.equals_missing(&by_index));
    let df = by_name;
    assert_eq!(df.height(), 3, "the empty row is skipped: {df}");
    // The category merged over rows 3 and 4 applies to both.
    assert_eq!(
        column(&df, "Kategorie"),
        some(&["Gebühren", "Gebühren", "Büro"])
    );
    let answers = column(&df, "Antwort");
    assert_eq!(
        answers[0].as_deref().unwrap().as_bytes(),
        ANSWER.as_bytes(),
        "umlauts, ß, € and – byte for byte"
    );
    assert_eq!(column(&df, "Betrag"), some(&["12", "12.50", "12.5%"]));
    let dates = column(&df, "Datum");
    assert_eq!(
        dates,
        vec![
            Some("2024-03-01".into()),
            Some("2024-03-01 10:30:00".into()),
            Some("12.5".into())
        ]
    );
    assert_eq!(
        column(&df, "Aktiv"),
        vec![Some("TRUE".into()), Some("FALSE".into()), None]
    );

    // The first sheet by default; the first non-empty row names the columns.
    let cover = read(&path, None, None).unwrap();
    assert_eq!(cover.get_column_names(), ["Nur ein Deckblatt"]);
    assert_eq!(cover.height(), 0);
}

#[test]
fn xlsx_rows_flow_into_the_instruction_format() {
    let dir = tempfile::tempdir().unwrap();
    workbook(dir.path());
    let p = prepare(
        dir.path(),
        "format = \"instruction\"\ncolumns.instruction = \"Frage\"\ncolumns.output = \"Antwort\"\n[[data.train]]\npath = \"faq.xlsx\"\nsheet = \"FAQ\"\nheader_row = 2",
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(p.report.train_sources[0].rows_read, 3);
    let tok = tokenizer();
    let texts: Vec<String> = p
        .train
        .iter()
        .map(|e| tok.decode(&e.input_ids).unwrap())
        .collect();
    assert!(texts.iter().any(|t| t.contains(ANSWER)), "{texts:#?}");
}

#[test]
fn bad_workbook_input_names_file_sheet_and_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = workbook(dir.path());
    let err = |sheet: Option<SheetRef>, header_row| {
        format!("{:#}", read(&path, sheet, header_row).unwrap_err())
    };
    let name = |n: &str| Some(SheetRef::Name(n.into()));

    let missing = err(name("Preise"), None);
    assert!(
        missing.contains("faq.xlsx")
            && missing.contains("`Preise`")
            && missing.contains("`Deckblatt`, `FAQ`, `Fehler`, `Doppelt`"),
        "{missing}"
    );
    let index = err(Some(SheetRef::Index(9)), None);
    assert!(
        index.contains("index 9") && index.contains("`FAQ`"),
        "{index}"
    );

    let cell = err(name("Fehler"), None);
    assert!(
        cell.contains("faq.xlsx")
            && cell.contains("sheet `Fehler`")
            && cell.contains("row 3")
            && cell.contains("B3")
            && cell.contains("#DIV/0!"),
        "{cell}"
    );
    // The merged title in row 1 spans every column: as a header, one name six times.
    let title = err(name("FAQ"), None);
    assert!(
        title.contains("sheet `FAQ`, row 1") && title.contains("appears twice"),
        "{title}"
    );
    let twice = err(name("Doppelt"), None);
    assert!(
        twice.contains("sheet `Doppelt`, row 1")
            && twice.contains("`Frage`")
            && twice.contains("columns A and C"),
        "{twice}"
    );
    let empty = err(name("FAQ"), Some(5));
    assert!(
        empty.contains("sheet `FAQ`, row 5") && empty.contains("header row is empty"),
        "{empty}"
    );

    let corrupt = dir.path().join("kaputt.xlsx");
    std::fs::write(&corrupt, b"PK\x03\x04 nicht wirklich ein Zip").unwrap();
    let bad = format!("{:#}", read(&corrupt, None, None).unwrap_err());
    assert!(
        bad.contains("kaputt.xlsx") && bad.contains("workbook"),
        "{bad}"
    );

    // Through the data stage: the error stops it, nothing is prepared.
    let stage = prepare(
        dir.path(),
        "format = \"instruction\"\ncolumns.instruction = \"Frage\"\ncolumns.output = \"Antwort\"\n[[data.train]]\npath = \"faq.xlsx\"\nsheet = \"Fehler\"",
    );
    let stage = format!(
        "{:#}",
        stage.err().expect("a cell error fails the data stage")
    );
    assert!(
        stage.contains("row 3") && stage.contains("#DIV/0!"),
        "{stage}"
    );

    // `sheet` on a csv read through a mirror index or suite: named.
    let csv = dir.path().join("faq.csv");
    std::fs::write(&csv, "Frage,Antwort\na,b\n").unwrap();
    let stray = format!("{:#}", read(&csv, name("FAQ"), None).unwrap_err());
    assert!(
        stray.contains("`sheet`") && stray.contains("faq.csv"),
        "{stray}"
    );
}

/// An .ods as LibreOffice writes it: a stored `mimetype` first, the manifest, then the content.
fn write_ods(path: &Path, rows: &str) {
    let mut zip = ::zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored = ::zip::write::SimpleFileOptions::default()
        .compression_method(::zip::CompressionMethod::Stored);
    zip.start_file("mimetype", stored).unwrap();
    zip.write_all(b"application/vnd.oasis.opendocument.spreadsheet")
        .unwrap();
    zip.start_file("META-INF/manifest.xml", stored).unwrap();
    zip.write_all(br#"<?xml version="1.0" encoding="UTF-8"?>
<manifest:manifest xmlns:manifest="urn:oasis:names:tc:opendocument:xmlns:manifest:1.0" manifest:version="1.2">
 <manifest:file-entry manifest:full-path="/" manifest:media-type="application/vnd.oasis.opendocument.spreadsheet"/>
 <manifest:file-entry manifest:full-path="content.xml" manifest:media-type="text/xml"/>
</manifest:manifest>"#).unwrap();
    zip.start_file("content.xml", stored).unwrap();
    write!(
        zip,
        r#"<?xml version="1.0" encoding="UTF-8"?>
<office:document-content xmlns:office="urn:oasis:names:tc:opendocument:xmlns:office:1.0" xmlns:table="urn:oasis:names:tc:opendocument:xmlns:table:1.0" xmlns:text="urn:oasis:names:tc:opendocument:xmlns:text:1.0" office:version="1.2">
<office:body><office:spreadsheet><table:table table:name="Tabelle1">{rows}</table:table></office:spreadsheet></office:body>
</office:document-content>"#
    )
    .unwrap();
    zip.finish().unwrap();
}

#[test]
fn ods_cells_read_as_calc_shows_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("faq.ods");
    let text = |t: &str| {
        format!(
            r#"<table:table-cell office:value-type="string"><text:p>{t}</text:p></table:table-cell>"#
        )
    };
    let row = |cells: &[String]| format!("<table:table-row>{}</table:table-row>", cells.concat());
    let rows = [
        row(&[text("Frage"), text("Antwort"), text("Betrag"), text("Datum")]),
        row(&[
            text("Wie hoch ist die Grundgebühr?"),
            text(ANSWER),
            r#"<table:table-cell office:value-type="float" office:value="12"><text:p>12</text:p></table:table-cell>"#.into(),
            r#"<table:table-cell office:value-type="date" office:date-value="2024-03-01"><text:p>01.03.24</text:p></table:table-cell>"#.into(),
        ]),
        "<table:table-row><table:table-cell/></table:table-row>".into(),
        row(&[
            text("Wann?"),
            text("Früh."),
            r#"<table:table-cell office:value-type="float" office:value="12.5"><text:p>12,5</text:p></table:table-cell>"#.into(),
            r#"<table:table-cell office:value-type="date" office:date-value="2024-03-01T10:30:00"><text:p>01.03.24 10:30</text:p></table:table-cell>"#.into(),
        ]),
    ];
    write_ods(&path, &rows.concat());
    let df = read(&path, Some(SheetRef::Name("Tabelle1".into())), None)
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(df.height(), 2, "{df}");
    assert_eq!(
        column(&df, "Antwort")[0].as_deref().unwrap().as_bytes(),
        ANSWER.as_bytes()
    );
    assert_eq!(column(&df, "Betrag"), some(&["12", "12.5"]));
    assert_eq!(
        column(&df, "Datum"),
        some(&["2024-03-01", "2024-03-01 10:30:00"])
    );
}
