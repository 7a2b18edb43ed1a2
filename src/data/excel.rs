//! Excel and OpenDocument workbooks (.xlsx, .xlsm, .xls, .ods) read with calamine into the same
//! all-text DataFrame a csv gives, so every format mapping works on them unchanged. Entry point:
//! [`read`].
//!
//! - **Sheet:** `sheet` by name or 0-based index; default the first.
//! - **Header:** `header_row` as Excel numbers rows (from 1); default the first non-empty row. A
//!   header cell left empty drops its column; a header row with no names, or one name twice, is
//!   an error.
//! - **Rows:** rows with no value in a named column are skipped; every other cell becomes text
//!   (empty cells null).
//! - **Merged cells** (.xlsx, .xls): the merged value fills every cell of its region, down and
//!   across. A row that only such a fill reaches is still skipped as empty. Calamine exposes no
//!   merges for .ods, where the covered cells stay empty.
//! - **Values** as Excel shows them:
//!   - Whole numbers are written without ".0"; other numbers with the decimals of their number
//!     format (`0.00`, `0.0%`), else to 15 significant digits, always with a decimal point.
//!   - Dates are ISO: `2024-03-01`, with ` 10:30:00` when they have a time; times alone are
//!     `10:30:00`.
//!   - Booleans are `TRUE` or `FALSE`.
//!   - A cell error (`#DIV/0!`) in a named column is an error naming file, sheet, row and cell.

use anyhow::{anyhow, bail, Context, Result};
use calamine::{open_workbook_auto, Data, Dimensions, ExcelDateTime, Reader, Sheets, StyleRange};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;

/// The file types read as workbooks.
pub const EXTENSIONS: &[&str] = &["xlsx", "xlsm", "xls", "ods"];

/// A sheet by 0-based index or by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SheetRef {
    Index(usize),
    Name(String),
}

/// The Excel-only option (`sheet`, else `header_row`) a source of file type `kind` sets though
/// it is no workbook, if any.
pub fn stray_option(kind: &str, sheet: bool, header_row: bool) -> Option<&'static str> {
    if EXTENSIONS.contains(&kind) {
        None
    } else if sheet {
        Some("sheet")
    } else if header_row {
        Some("header_row")
    } else {
        None
    }
}

/// One cell as shown: nothing, text, or an Excel error such as `#DIV/0!`.
#[derive(Clone, PartialEq)]
enum Shown {
    Empty,
    Text(String),
    Error(String),
}

/// Reads sheet `sheet` of workbook `path` with its column names in Excel row `header_row`.
pub fn read(path: &Path, sheet: Option<&SheetRef>, header_row: Option<u32>) -> Result<DataFrame> {
    let file = path.display();
    let mut book = crate::failure::caught(|| open_workbook_auto(path))
        .and_then(|opened| opened.map_err(|e| anyhow!("{e}")))
        .map_err(|e| {
            anyhow!("cannot read {file} as a workbook: it is corrupt or of another type ({e})")
        })?;
    let names = book.sheet_names();
    let listed = || format!("its sheets are: {}", quoted(&names));
    let name = match sheet {
        None => names
            .first()
            .with_context(|| format!("{file}: the workbook has no sheets"))?,
        Some(SheetRef::Name(n)) => names
            .iter()
            .find(|s| *s == n)
            .with_context(|| format!("{file}: no sheet `{n}`; {}", listed()))?,
        Some(SheetRef::Index(i)) => names
            .get(*i)
            .with_context(|| format!("{file}: no sheet at index {i} (0-based); {}", listed()))?,
    }
    .clone();
    let at = format!("{file}, sheet `{name}`");
    let (values, merges, styles) = crate::failure::caught(|| sheet_parts(&mut book, &name))
        .and_then(|parts| parts)
        .map_err(|e| anyhow!("{at}: cannot read it: the workbook is corrupt ({e})"))?;
    let Some((first_row, first_col)) = values.start() else {
        bail!("{at}: the sheet is empty");
    };
    let mut grid: Vec<Vec<Shown>> = values
        .rows()
        .enumerate()
        .map(|(r, row)| {
            row.iter()
                .enumerate()
                .map(|(c, v)| {
                    let pos = (first_row + r as u32, first_col + c as u32);
                    let format = styles.get(pos).and_then(|s| s.number_format.as_ref());
                    shown(v, format.map(|f| f.format_code.as_str()))
                })
                .collect()
        })
        .collect();
    // Which rows are empty is judged on the sheet's own cells, before merges fill them.
    let own = grid.clone();
    let blank: Vec<bool> = own
        .iter()
        .map(|row| row.iter().all(|c| *c == Shown::Empty))
        .collect();
    fill_merges(&mut grid, &merges, (first_row, first_col));

    let header = match header_row {
        Some(0) => bail!("{at}: header_row counts from 1, as Excel numbers rows"),
        Some(n) => (n - 1).checked_sub(first_row).map(|r| r as usize),
        None => blank.iter().position(|b| !b),
    };
    let excel_row = |r: usize| first_row as usize + r + 1;
    let shown_header = header_row.unwrap_or_else(|| excel_row(header.unwrap_or(0)) as u32);
    let Some(header) = header.filter(|&h| h < grid.len() && !blank[h]) else {
        bail!("{at}, row {shown_header}: the header row is empty; set header_row to the row that names the columns");
    };
    let mut columns: Vec<(usize, String)> = Vec::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (c, cell) in grid[header].iter().enumerate() {
        let title = match cell {
            Shown::Empty => continue,
            Shown::Text(t) if t.trim().is_empty() => continue,
            Shown::Text(t) => t.trim().to_string(),
            Shown::Error(e) => bail!(
                "{at}, row {shown_header}: header cell {} holds the error {e}",
                cell_name(first_col, c, excel_row(header))
            ),
        };
        if let Some(&before) = seen.get(&title) {
            bail!(
                "{at}, row {shown_header}: the column name `{title}` appears twice (columns {} and {}); rename one, or set header_row",
                column_letters(first_col + before as u32),
                column_letters(first_col + c as u32)
            );
        }
        seen.insert(title.clone(), c);
        columns.push((c, title));
    }

    let mut data: Vec<Vec<Option<String>>> = vec![Vec::new(); columns.len()];
    for (r, row) in grid.iter().enumerate().skip(header + 1) {
        let used = columns
            .iter()
            .any(|(c, _)| own[r].get(*c).is_some_and(|v| *v != Shown::Empty));
        if !used {
            continue;
        }
        for ((c, title), out) in columns.iter().zip(&mut data) {
            out.push(match row.get(*c).unwrap_or(&Shown::Empty) {
                Shown::Empty => None,
                Shown::Text(t) => Some(t.clone()),
                Shown::Error(e) => bail!(
                    "{at}, row {}: cell {} (column `{title}`) holds the error {e}; fix or clear it in the workbook",
                    excel_row(r),
                    cell_name(first_col, *c, excel_row(r))
                ),
            });
        }
    }
    let series: Vec<Column> = columns
        .into_iter()
        .zip(data)
        .map(|((_, title), values)| Column::new(title.into(), values))
        .collect();
    Ok(DataFrame::new_infer_height(series)?)
}

/// The values, merged regions and cell styles of one sheet.
fn sheet_parts(
    book: &mut Sheets<std::io::BufReader<std::fs::File>>,
    name: &str,
) -> Result<(calamine::Range<Data>, Vec<Dimensions>, StyleRange)> {
    let values = book.worksheet_range(name)?;
    let merges = match book {
        Sheets::Xlsx(x) => x.merge_cells_by_sheet_name(name)?,
        Sheets::Xls(x) => x.merge_cells_by_sheet_name(name)?,
        Sheets::Xlsb(_) | Sheets::Ods(_) => Vec::new(),
    };
    Ok((values, merges, book.worksheet_style(name)?))
}

/// Copies each merged region's first cell into the rest of the region (within the grid).
fn fill_merges(grid: &mut [Vec<Shown>], merges: &[Dimensions], (row0, col0): (u32, u32)) {
    let at = |pos: (u32, u32)| {
        let r = pos.0.checked_sub(row0)? as usize;
        let c = pos.1.checked_sub(col0)? as usize;
        Some((r, c))
    };
    for m in merges {
        let Some(value) = at(m.start).and_then(|(r, c)| grid.get(r)?.get(c)).cloned() else {
            continue;
        };
        for row in m.start.0..=m.end.0 {
            for col in m.start.1..=m.end.1 {
                if let Some(cell) = at((row, col)).and_then(|(r, c)| grid.get_mut(r)?.get_mut(c)) {
                    *cell = value.clone();
                }
            }
        }
    }
}

/// A cell's value as Excel shows it (see the module documentation); `format` is its number
/// format code where the workbook has one.
fn shown(value: &Data, format: Option<&str>) -> Shown {
    let text = match value {
        Data::Empty => return Shown::Empty,
        Data::Error(e) => return Shown::Error(e.to_string()),
        Data::String(s) if s.is_empty() => return Shown::Empty,
        Data::String(s) => s.clone(),
        Data::Int(i) => i.to_string(),
        Data::Float(f) => number(*f, format),
        Data::Bool(b) => (if *b { "TRUE" } else { "FALSE" }).to_string(),
        Data::DateTime(d) => date_time(d),
        Data::DateTimeIso(s) => s.replacen('T', " ", 1),
        Data::DurationIso(s) => iso_duration(s).unwrap_or_else(|| s.clone()),
    };
    Shown::Text(text)
}

/// A number with the decimals (and percent sign) of its format code, else as Excel's General
/// format shows it: whole numbers without ".0", others to 15 significant digits.
fn number(value: f64, format: Option<&str>) -> String {
    let code = format.map(first_section).unwrap_or_default();
    if code.is_empty() || code.eq_ignore_ascii_case("general") || !code.contains(['0', '#']) {
        // Rounding to 15 significant digits turns 0.30000000000000004 into 0.3, as Excel shows it.
        let rounded: f64 = format!("{value:.14e}").parse().unwrap_or(value);
        return format!("{}", rounded + 0.0);
    }
    let decimals = code
        .split_once('.')
        .map(|(_, after)| after.chars().take_while(|&c| c == '0' || c == '#').count())
        .unwrap_or(0);
    let percent = code.contains('%');
    let scaled = if percent { value * 100.0 } else { value };
    format!("{scaled:.decimals$}{}", if percent { "%" } else { "" })
}

/// The part of a number format code for positive numbers, without quoted text, `[...]` tags
/// (colours, locales) and escaped characters.
fn first_section(code: &str) -> String {
    let mut out = String::new();
    let mut chars = code.chars();
    while let Some(c) = chars.next() {
        match c {
            ';' => break,
            '"' => chars.by_ref().take_while(|&q| q != '"').for_each(drop),
            '[' => chars.by_ref().take_while(|&q| q != ']').for_each(drop),
            '\\' | '_' | '*' => {
                chars.next();
            }
            c => out.push(c),
        }
    }
    out.trim().to_string()
}

/// A date as `YYYY-MM-DD`, with ` HH:MM:SS` when it has a time; a time alone (or a duration) as
/// `HH:MM:SS`.
fn date_time(d: &ExcelDateTime) -> String {
    let serial = d.as_f64();
    if d.is_duration() || (0.0..1.0).contains(&serial) {
        let seconds = (serial * 86_400.0).round() as i64;
        let (h, m, s) = (seconds / 3600, seconds / 60 % 60, seconds % 60);
        return format!("{h:02}:{m:02}:{s:02}");
    }
    let (year, month, day, h, m, s, _) = d.to_ymd_hms_milli();
    if (h, m, s) == (0, 0, 0) {
        format!("{year:04}-{month:02}-{day:02}")
    } else {
        format!("{year:04}-{month:02}-{day:02} {h:02}:{m:02}:{s:02}")
    }
}

/// An ODS time (`PT10H30M00S`) as `10:30:00`.
fn iso_duration(text: &str) -> Option<String> {
    let rest = text.strip_prefix("PT")?;
    let (h, rest) = rest.split_once('H')?;
    let (m, rest) = rest.split_once('M')?;
    let s = rest.strip_suffix('S')?;
    let seconds = s.parse::<f64>().ok()?.round() as u64;
    Some(format!(
        "{:02}:{:02}:{seconds:02}",
        h.parse::<u64>().ok()?,
        m.parse::<u64>().ok()?
    ))
}

/// A column's letters as Excel shows them (0 → A, 26 → AA).
fn column_letters(mut col: u32) -> String {
    let mut letters = Vec::new();
    loop {
        letters.push(b'A' + (col % 26) as u8);
        if col < 26 {
            break;
        }
        col = col / 26 - 1;
    }
    letters.reverse();
    String::from_utf8(letters).unwrap_or_default()
}

/// A cell's name (`B5`) from the sheet's first column, the column's offset and the Excel row.
fn cell_name(first_col: u32, offset: usize, row: usize) -> String {
    format!("{}{row}", column_letters(first_col + offset as u32))
}

fn quoted(names: &[String]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_show_as_their_format_says() {
        assert_eq!(number(12.0, None), "12");
        assert_eq!(number(12.5, Some("General")), "12.5");
        assert_eq!(number(0.1 + 0.2, None), "0.3");
        assert_eq!(number(12.5, Some("#,##0.00 \"€\"")), "12.50");
        assert_eq!(number(0.125, Some("0.0%")), "12.5%");
        assert_eq!(number(3.0, Some("0")), "3");
        assert_eq!(column_letters(0), "A");
        assert_eq!(column_letters(27), "AB");
        assert_eq!(iso_duration("PT10H30M00S").as_deref(), Some("10:30:00"));
    }
}
