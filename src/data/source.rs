//! The files of a source (local files and globs, Hub datasets through a local mirror folder
//! (`<mirror>/<org>/<name>/...` or a `mirror.toml` index) or the hub cache), and reading them into
//! Polars DataFrames: parquet, jsonl/ndjson, json, csv, tsv, plain text, Excel and OpenDocument
//! workbooks, nested JSON records (SQuAD). Documents (.pdf, .docx, ...) are read by
//! [`super::documents`], SQL queries by [`super::sql`].

use anyhow::{anyhow, bail, Context, Result};
use polars::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::excel::{self, SheetRef};
use super::text_encoding;
use crate::recipe::{Recipe, SourceSpec};

/// How to read a file, beyond what its extension says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReadOptions {
    /// `parquet`, `jsonl`/`ndjson`, `json`, `csv`, `tsv`, `text` (the whole file is one `text` row),
    /// `paragraphs` (one `text` row per blank-line-separated paragraph), or a document kind (`pdf`,
    /// `docx`, `html`, `md`, read by [`super::documents`]); default: the extension.
    pub file_type: Option<String>,
    /// csv/tsv: the field delimiter (one character; default `,`, or tab for tsv).
    pub delimiter: Option<String>,
    /// csv/tsv: the quote character (default `"`; empty for none).
    pub quote: Option<String>,
    /// csv/tsv/text/html/md: `utf8` (default; invalid bytes are an error), `utf8-lossy` (replaced and
    /// counted), `windows-1252`, `latin-1`, `utf-16` or `auto` (see [`text_encoding`]).
    pub encoding: Option<String>,
    /// csv/tsv: whether the first line names the columns (else column_1, column_2, ...).
    pub has_header: bool,
    /// json: the path of nested record arrays to flatten (SQuAD: `data/paragraphs/qas`); each
    /// record gets the fields of its parents.
    pub records: Option<String>,
    /// xlsx/xlsm/xls/ods: the sheet, by name or 0-based index (default: the first).
    pub sheet: Option<SheetRef>,
    /// xlsx/xlsm/xls/ods: the row (from 1, as Excel numbers rows) that names the columns
    /// (default: the first non-empty row).
    pub header_row: Option<u32>,
    /// Columns renamed after reading (old = new).
    pub rename: BTreeMap<String, String>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            file_type: None,
            delimiter: None,
            quote: None,
            encoding: None,
            has_header: true,
            records: None,
            sheet: None,
            header_row: None,
            rename: BTreeMap::new(),
        }
    }
}

/// The files of a dataset and how to read them.
#[derive(Debug, Clone)]
pub struct DatasetFiles {
    pub files: Vec<PathBuf>,
    pub options: ReadOptions,
}

/// The mirror folder: the recipe's `[data] mirror`, else FEINSCHLIFF_MIRROR.
pub fn mirror_dir(configured: Option<PathBuf>) -> Option<PathBuf> {
    configured.or_else(|| std::env::var_os("FEINSCHLIFF_MIRROR").map(PathBuf::from))
}

/// The files of a recipe source and how to read them.
pub fn files(recipe: &Recipe, spec: &SourceSpec) -> Result<DatasetFiles> {
    let options = spec.read_options();
    if let Some(hub) = &spec.hub {
        let mirror = mirror_dir(recipe.data.mirror.as_ref().map(|m| recipe.resolve(m)));
        let split = spec.split.as_deref().unwrap_or("train");
        return hub_files(
            hub,
            spec.config.as_deref(),
            split,
            spec.revision.as_deref(),
            mirror.as_deref(),
            options,
        );
    }
    let pattern = spec.path.as_deref().context("source without path")?;
    let files = expand(&recipe.resolve(pattern))?;
    Ok(DatasetFiles { files, options })
}

/// A path, or the sorted files a glob matches.
pub fn expand(full: &Path) -> Result<Vec<PathBuf>> {
    let full_str = full.to_string_lossy().to_string();
    if !full_str.contains(['*', '?', '[']) {
        if !full.exists() {
            bail!(
                "{} does not exist (relative paths are read from the recipe's or suite's folder)",
                full.display()
            );
        }
        return Ok(vec![full.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = glob::glob(&full_str)
        .map_err(|e| anyhow!("bad glob `{full_str}`: {e}"))?
        .filter_map(Result::ok)
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("glob `{full_str}` matches no file");
    }
    Ok(files)
}

/// The files of split `split` (and `config`) of Hub dataset `repo_id`: from the mirror when it
/// has them, else from the Hub's parquet conversion (cache first; HF_HUB_OFFLINE keeps to it).
pub fn hub_files(
    repo_id: &str,
    config: Option<&str>,
    split: &str,
    revision: Option<&str>,
    mirror: Option<&Path>,
    options: ReadOptions,
) -> Result<DatasetFiles> {
    let (org, name) = crate::hub::split_repo_id(repo_id)?;
    if let Some(mirror) = mirror {
        if let Some(found) = mirror_index(mirror, repo_id, config, split)? {
            return Ok(found);
        }
        let root = mirror.join(org).join(name);
        if root.is_dir() {
            let files = split_files(&root, Some(config.unwrap_or("default")), split)?;
            if files.is_empty() {
                bail!(
                    "mirror {} has no files for split `{split}`{}; expected e.g. {}/{split}.jsonl or {}/{}/{split}/*.parquet",
                    root.display(),
                    config.map(|c| format!(" of config `{c}`")).unwrap_or_default(),
                    root.display(),
                    root.display(),
                    config.unwrap_or("default")
                );
            }
            return Ok(DatasetFiles { files, options });
        }
        if crate::hub::offline() {
            bail!("dataset {repo_id} is not in the mirror {} (no {} and no entry in its mirror.toml) and HF_HUB_OFFLINE is set", mirror.display(), root.display());
        }
    }
    let config = config.unwrap_or("default");
    let dir = crate::hub::dataset_snapshot(repo_id, config, split, revision)?;
    let files = split_files(&dir, Some(config), split)?;
    if files.is_empty() {
        bail!("dataset {repo_id} has no files for config `{config}`, split `{split}`");
    }
    Ok(DatasetFiles { files, options })
}

/// One entry of a mirror's `mirror.toml`: the local files (and how to read them into the Hub
/// dataset's columns) that stand for a dataset split.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorEntry {
    repo: String,
    #[serde(default)]
    config: Option<String>,
    split: String,
    /// Paths relative to the mirror folder.
    files: Vec<String>,
    #[serde(default)]
    read: ReadOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorIndex {
    #[serde(default)]
    dataset: Vec<MirrorEntry>,
}

/// What `<mirror>/mirror.toml` maps a dataset split to, if it lists it; listed files that do not
/// exist are an error naming them.
fn mirror_index(
    mirror: &Path,
    repo_id: &str,
    config: Option<&str>,
    split: &str,
) -> Result<Option<DatasetFiles>> {
    let index = mirror.join("mirror.toml");
    if !index.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&index)
        .with_context(|| format!("cannot read {}", index.display()))?;
    let parsed: MirrorIndex =
        toml::from_str(&text).map_err(|e| anyhow!("mirror index {}: {e}", index.display()))?;
    let Some(entry) = parsed.dataset.into_iter().find(|d| {
        d.repo == repo_id && d.split == split && (config.is_none() || d.config.as_deref() == config)
    }) else {
        return Ok(None);
    };
    let files: Vec<PathBuf> = entry.files.iter().map(|f| mirror.join(f)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        bail!(
            "mirror index {} maps {repo_id} split `{split}` to {}, which does not exist",
            index.display(),
            missing.display()
        );
    }
    Ok(Some(DatasetFiles {
        files,
        options: entry.read,
    }))
}

/// Data file extensions the readers know.
const DATA_EXTENSIONS: &[&str] = &[
    "parquet", "jsonl", "ndjson", "json", "csv", "tsv", "xlsx", "xlsm", "xls", "ods",
];

/// The files of a split in a dataset folder, trying the layouts datasets use, first match wins:
/// `<config>/<split>/*`, `<config>/<split>.*`, `<config>/<split>-*`, `<split>/*`, `<split>.*`,
/// `<split>-*`, `data/<split>-*`, `data/<split>.*`.
pub fn split_files(root: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    let mut patterns = Vec::new();
    if let Some(c) = config {
        patterns.extend([
            format!("{c}/{split}/*"),
            format!("{c}/{split}.*"),
            format!("{c}/{split}-*"),
        ]);
    }
    patterns.extend([
        format!("{split}/*"),
        format!("{split}.*"),
        format!("{split}-*"),
        format!("data/{split}-*"),
        format!("data/{split}.*"),
    ]);
    for p in patterns {
        let full = root.join(&p);
        let mut files: Vec<PathBuf> = glob::glob(&full.to_string_lossy())
            .with_context(|| format!("bad pattern {p}"))?
            .filter_map(Result::ok)
            .filter(|f| {
                f.is_file()
                    && f.extension()
                        .and_then(|e| e.to_str())
                        .is_some_and(|e| DATA_EXTENSIONS.contains(&e))
            })
            .collect();
        if !files.is_empty() {
            files.sort();
            return Ok(files);
        }
    }
    Ok(Vec::new())
}

/// Reads one file with the reader its type calls for, then renames columns.
pub fn read_file(path: &Path, options: &ReadOptions) -> Result<DataFrame> {
    let kind = file_kind(path, options.file_type.as_deref());
    if let Some(key) =
        excel::stray_option(&kind, options.sheet.is_some(), options.header_row.is_some())
    {
        bail!(
            "{}: `{key}` applies only to Excel and OpenDocument workbooks (.xlsx, .xlsm, .xls, .ods), not to `{kind}`",
            path.display()
        );
    }
    if super::documents::is_document(&kind) {
        bail!(
            "{}: documents (.pdf, .docx, .html, .htm, .md) are read only by `[[data.train]]` and `[[data.validation]]` sources, as text samples",
            path.display()
        );
    }
    let open =
        || std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()));
    let mut df = match kind.as_str() {
        _ if options.records.is_some() => nested_records(path, options.records.as_deref().unwrap_or_default())?,
        // Schemas are inferred from every row: a field that only late rows have must not vanish.
        "jsonl" | "ndjson" => read_json(open()?, JsonFormat::JsonLines).map_err(|e| json_lines_error(path, e))?,
        "json" => read_json(open()?, JsonFormat::Json).map_err(|e| explain(path, e))?,
        "parquet" => read_parquet(path, open()?)?,
        "csv" | "tsv" => read_csv(path, options, kind == "tsv")?,
        k if excel::EXTENSIONS.contains(&k) => excel::read(path, options.sheet.as_ref(), options.header_row)?,
        "text" | "paragraphs" => {
            let text = decoded_text(path, options)?;
            let rows: Vec<String> = if kind == "text" {
                vec![text]
            } else {
                text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()).map(str::to_string).collect()
            };
            df!("text" => rows)?
        }
        other => bail!(
            "{}: unsupported file type `{other}`; use .parquet, .jsonl, .ndjson, .json, .csv, .tsv, .xlsx, .xlsm, .xls, .ods, or a document for format = \"text\" (.pdf, .docx, .html, .htm, .md) (or set file_type)",
            path.display()
        ),
    };
    for (old, new) in &options.rename {
        df.rename(old, new.as_str().into()).map_err(|_| {
            anyhow!(
                "{}: cannot rename column `{old}`: it does not exist",
                path.display()
            )
        })?;
    }
    Ok(df)
}

/// How a file is read: its `file_type`, else its extension, in lower case.
pub fn file_kind(path: &Path, file_type: Option<&str>) -> String {
    file_type
        .or_else(|| path.extension().and_then(|e| e.to_str()))
        .unwrap_or("")
        .to_lowercase()
}

/// JSON or JSON lines, with the schema inferred from every row (a field only late rows have must
/// not vanish).
fn read_json<R: polars::io::mmap::MmapBytesReader>(
    reader: R,
    format: JsonFormat,
) -> PolarsResult<DataFrame> {
    JsonReader::new(reader)
        .with_json_format(format)
        .infer_schema_len(None)
        .finish()
}

/// A parquet file. polars panics on some corrupt files (in thrift decoding, bit-unpacking): that
/// is an error naming the file too.
fn read_parquet(path: &Path, file: std::fs::File) -> Result<DataFrame> {
    crate::failure::caught(move || ParquetReader::new(file).finish())
        .map_err(|e| {
            anyhow!(
                "cannot read {} as parquet: the file is corrupt ({e})",
                path.display()
            )
        })?
        .map_err(|e| anyhow!("cannot read {} as parquet: {e}", path.display()))
}

fn read_csv(path: &Path, options: &ReadOptions, tsv: bool) -> Result<DataFrame> {
    let one_byte = |key: &str, v: &str| -> Result<Option<u8>> {
        match v.as_bytes() {
            [] => Ok(None),
            [b] => Ok(Some(*b)),
            _ if v == "\\t" => Ok(Some(b'\t')),
            _ => bail!(
                "{}: `{key}` must be a single ASCII character, got `{v}`",
                path.display()
            ),
        }
    };
    let delimiter = match &options.delimiter {
        Some(d) => one_byte("delimiter", d)?.context("`delimiter` must not be empty")?,
        None if tsv => b'\t',
        None => b',',
    };
    let quote = match &options.quote {
        Some(q) => one_byte("quote", q)?,
        None => Some(b'"'),
    };
    let text = decoded_text(path, options)?;
    CsvReadOptions::default()
        .with_has_header(options.has_header)
        .with_infer_schema_length(Some(10_000))
        .map_parse_options(|p| p.with_separator(delimiter).with_quote_char(quote))
        .into_reader_with_file_handle(std::io::Cursor::new(text.into_bytes()))
        .finish()
        .map_err(|e| csv_error(path, delimiter, quote, e))
}

/// The file as UTF-8 text in the source's `encoding`; says which encoding `auto` chose and how
/// many invalid sequences `utf8-lossy` replaced.
pub(crate) fn decoded_text(path: &Path, options: &ReadOptions) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let decoded = text_encoding::decode(path, bytes, options.encoding.as_deref())?;
    if options.encoding.as_deref() == Some("auto") {
        tracing::info!(
            "{}: read as {} (encoding = \"auto\")",
            path.display(),
            decoded.encoding
        );
    }
    if decoded.replaced > 0 {
        tracing::warn!(
            "{}: {} invalid UTF-8 sequences replaced by U+FFFD (encoding = \"utf8-lossy\"); if the file is Windows-1252 (Excel's CSV), set encoding = \"windows-1252\" or \"auto\"",
            path.display(),
            decoded.replaced
        );
    }
    Ok(decoded.text)
}

/// A JSON document whose records sit in nested arrays, flattened to one row per record.
fn nested_records(path: &Path, records: &str) -> Result<DataFrame> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let root: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let steps: Vec<&str> = records.split('/').filter(|s| !s.is_empty()).collect();
    let mut rows = Vec::new();
    flatten_records(&root, &steps, &serde_json::Map::new(), &mut rows);
    if rows.is_empty() {
        bail!("{}: no records at `{records}`", path.display());
    }
    let mut lines = Vec::new();
    for r in rows {
        serde_json::to_writer(&mut lines, &r)?;
        lines.push(b'\n');
    }
    read_json(std::io::Cursor::new(lines), JsonFormat::JsonLines).map_err(|e| explain(path, e))
}

/// Walks `steps` (keys holding arrays) down from `node`, giving each record its parents' fields.
fn flatten_records(
    node: &serde_json::Value,
    steps: &[&str],
    inherited: &serde_json::Map<String, serde_json::Value>,
    out: &mut Vec<serde_json::Value>,
) {
    let mut fields = inherited.clone();
    if let serde_json::Value::Object(map) = node {
        for (k, v) in map {
            if steps.first() != Some(&k.as_str()) {
                fields.insert(k.clone(), v.clone());
            }
        }
    }
    match steps.split_first() {
        None => out.push(serde_json::Value::Object(fields)),
        Some((key, rest)) => {
            if let Some(serde_json::Value::Array(items)) = node.get(*key) {
                for item in items {
                    flatten_records(item, rest, &fields, out);
                }
            }
        }
    }
}

/// A JSON-lines reader error with the 1-based line of the first row polars cannot read: one
/// that is not a JSON object, else one whose field changes its type (polars' message added).
fn json_lines_error(path: &Path, e: PolarsError) -> anyhow::Error {
    let Ok(bytes) = std::fs::read(path) else {
        return explain(path, e);
    };
    if super::locate::blank(&bytes) {
        return anyhow!("cannot read {}: the file holds no rows", path.display());
    }
    if let Some((line, why)) = super::locate::json_line_syntax(&bytes) {
        return anyhow!("cannot read {}: line {line}: {why}", path.display());
    }
    match super::locate::json_line_types(&bytes) {
        Some((line, why)) => anyhow!("cannot read {}: line {line}: {why} ({e})", path.display()),
        None => explain(path, e),
    }
}

/// A csv reader error with the 1-based line of the first record whose fields do not line up
/// (or whose quote never closes), when there is one, and polars' message.
fn csv_error(path: &Path, delimiter: u8, quote: Option<u8>, e: PolarsError) -> anyhow::Error {
    let located = std::fs::read(path)
        .ok()
        .and_then(|bytes| super::locate::csv_record(&bytes, delimiter, quote));
    match located {
        Some((line, why)) if !e.to_string().to_lowercase().contains("utf") => {
            anyhow!("cannot read {}: line {line}: {why} ({e})", path.display())
        }
        _ => explain(path, e),
    }
}

/// A reader error with the file named and, for encoding problems, the fix.
fn explain(path: &Path, e: PolarsError) -> anyhow::Error {
    let msg = e.to_string();
    if msg.to_lowercase().contains("utf") {
        anyhow!("{} is not valid UTF-8 ({msg}); re-encode it as UTF-8, or for csv set encoding = \"utf8-lossy\" on the source", path.display())
    } else {
        anyhow!("cannot read {}: {msg}", path.display())
    }
}
