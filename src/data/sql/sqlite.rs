//! SQLite sources: the database file is opened read-only (a missing file is an error, never
//! created) and each value is read by its storage class; a BLOB is refused, naming the column.

use anyhow::{anyhow, bail, Result};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags};
use std::path::Path;

use super::{Cell, Rows};

/// Runs `sql` on the database file `path`.
pub fn query(path: &Path, sql: &str) -> Result<Rows> {
    if !path.is_file() {
        bail!(
            "SQLite database {} does not exist (relative paths are read from the recipe's folder)",
            path.display()
        );
    }
    let failed = |e: rusqlite::Error| anyhow!("query failed: {e}");
    let db = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| anyhow!("cannot open SQLite database {}: {e}", path.display()))?;
    let mut statement = db.prepare(sql).map_err(failed)?;
    let names: Vec<String> = statement.column_names().map(str::to_string).collect();
    let mut cells: Vec<Vec<Cell>> = names.iter().map(|_| Vec::new()).collect();
    let mut rows = statement.query([]).map_err(failed)?;
    let mut number = 0;
    while let Some(row) = rows.next().map_err(failed)? {
        number += 1;
        for (i, column) in cells.iter_mut().enumerate() {
            let name = &names[i];
            column.push(match row.get_ref(i).map_err(failed)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Real(v) => Cell::Float(v),
                ValueRef::Text(bytes) => Cell::Text(
                    String::from_utf8(bytes.to_vec()).map_err(|e| {
                        anyhow!("column `{name}`, row {number}: the text is not valid UTF-8 ({e})")
                    })?,
                ),
                ValueRef::Blob(_) => bail!(
                    "column `{name}` holds binary data (a BLOB, row {number}), which cannot become text; select text, numbers or NULL"
                ),
            });
        }
    }
    Ok(Rows { names, cells })
}
