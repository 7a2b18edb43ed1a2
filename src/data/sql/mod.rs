//! SQL sources: `sql = "SELECT ..."` with `connection = "sqlite://FILE"` or
//! `"postgres://USER@HOST[:PORT]/DB"`. The query's rows become a DataFrame as a file's rows do,
//! so formats, column mapping and templates work unchanged: integers become Int64 columns,
//! floats Float64, text String and NULL null (a column that mixes text and numbers, as SQLite
//! allows, becomes text). Binary values are refused, naming the column.

mod connection;
mod password;
mod pg;
mod sqlite;

use anyhow::{bail, Context, Result};
use polars::prelude::*;
use std::collections::HashSet;

use crate::recipe::{Recipe, SourceSpec};
pub use connection::without_password;
use connection::Connection;

/// One value of a result row.
#[derive(Debug)]
enum Cell {
    Null,
    Int(i64),
    Float(f64),
    Text(String),
}

impl From<Option<i64>> for Cell {
    fn from(v: Option<i64>) -> Self {
        v.map_or(Cell::Null, Cell::Int)
    }
}

impl From<Option<f64>> for Cell {
    fn from(v: Option<f64>) -> Self {
        v.map_or(Cell::Null, Cell::Float)
    }
}

impl From<Option<String>> for Cell {
    fn from(v: Option<String>) -> Self {
        v.map_or(Cell::Null, Cell::Text)
    }
}

/// A query's result: column names and, per column, its values.
struct Rows {
    names: Vec<String>,
    cells: Vec<Vec<Cell>>,
}

/// What is wrong with a source's SQL keys, found before anything is read: `connection` or
/// `password_file` without `sql`, `sql` without a connection, a connection that does not parse
/// or holds a password, and keys that apply to files or Hub datasets only.
pub fn check(spec: &SourceSpec, recipe: &Recipe) -> Result<()> {
    let Some(sql) = &spec.sql else {
        if spec.connection.is_some() || spec.password_file.is_some() {
            bail!("`connection` and `password_file` belong to SQL sources: add `sql = \"SELECT ...\"`");
        }
        return Ok(());
    };
    if sql.trim().is_empty() {
        bail!("`sql` is empty");
    }
    let text = spec.connection.as_deref().context(
        "`sql` needs a `connection`: \"sqlite://FILE\" or \"postgres://USER@HOST[:PORT]/DB\"",
    )?;
    let connection = Connection::parse(text, recipe)?;
    if spec.password_file.is_some() && matches!(connection, Connection::Sqlite(_)) {
        bail!("`password_file` applies to postgres:// connections; SQLite has no password");
    }
    let file_keys = [
        ("config", spec.config.is_some()),
        ("split", spec.split.is_some()),
        ("revision", spec.revision.is_some()),
        ("file_type", spec.file_type.is_some()),
        ("delimiter", spec.delimiter.is_some()),
        ("quote", spec.quote.is_some()),
        ("encoding", spec.encoding.is_some()),
        ("has_header", !spec.has_header),
        ("sheet", spec.sheet.is_some()),
        ("header_row", spec.header_row.is_some()),
    ];
    if let Some((key, _)) = file_keys.iter().find(|(_, set)| *set) {
        bail!("`{key}` applies to files and Hub datasets, not to an SQL source");
    }
    Ok(())
}

/// Runs the source's query where its connection says.
pub fn read(recipe: &Recipe, spec: &SourceSpec) -> Result<DataFrame> {
    let sql = spec.sql.as_deref().context("source without `sql`")?;
    let text = spec
        .connection
        .as_deref()
        .context("`sql` needs a `connection`")?;
    let rows = match Connection::parse(text, recipe)? {
        Connection::Sqlite(path) => sqlite::query(&path, sql)?,
        Connection::Postgres(config) => {
            let password_file = spec.password_file.as_deref().map(|f| recipe.resolve(f));
            let password = password::find(&config, password_file.as_deref())?;
            pg::query(&config, password, sql)?
        }
    };
    frame(rows)
}

/// The rows as a DataFrame, one column per result column.
fn frame(rows: Rows) -> Result<DataFrame> {
    let mut seen = HashSet::new();
    if let Some(twice) = rows.names.iter().find(|n| !seen.insert(n.as_str())) {
        bail!("the query returns two columns named `{twice}`; name them apart with AS");
    }
    let columns: Vec<Column> = rows
        .names
        .iter()
        .zip(rows.cells)
        .map(|(name, cells)| column(name, cells))
        .collect();
    Ok(DataFrame::new_infer_height(columns)?)
}

/// Text if any value is text, else floats if any is a float, else integers; all NULL: nulls.
fn column(name: &str, cells: Vec<Cell>) -> Column {
    let any = |f: fn(&Cell) -> bool| cells.iter().any(f);
    if any(|c| matches!(c, Cell::Text(_))) {
        let values: Vec<Option<String>> = cells
            .into_iter()
            .map(|c| match c {
                Cell::Null => None,
                Cell::Int(v) => Some(v.to_string()),
                Cell::Float(v) => Some(v.to_string()),
                Cell::Text(s) => Some(s),
            })
            .collect();
        Column::new(name.into(), values)
    } else if any(|c| matches!(c, Cell::Float(_))) {
        let values: Vec<Option<f64>> = cells
            .into_iter()
            .map(|c| match c {
                Cell::Int(v) => Some(v as f64),
                Cell::Float(v) => Some(v),
                _ => None,
            })
            .collect();
        Column::new(name.into(), values)
    } else if any(|c| matches!(c, Cell::Int(_))) {
        let values: Vec<Option<i64>> = cells
            .into_iter()
            .map(|c| match c {
                Cell::Int(v) => Some(v),
                _ => None,
            })
            .collect();
        Column::new(name.into(), values)
    } else {
        Column::full_null(name.into(), cells.len(), &DataType::Null)
    }
}
