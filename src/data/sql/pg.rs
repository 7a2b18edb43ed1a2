//! PostgreSQL sources: the query runs in a read-only transaction through the synchronous
//! `postgres` client (no TLS); smallint/integer/bigint, real/double precision and text-like
//! columns (text, varchar, char, name, citext) are read, bytea is refused, and any other type
//! is an error that says how to cast it in the query.

use anyhow::{anyhow, bail, Result};
use postgres::types::{FromSql, Type};
use postgres::{Config, NoTls, Row};
use std::time::Duration;

use super::connection::WHERE_PASSWORDS_GO;
use super::{Cell, Rows};

/// How a column's values are read.
#[derive(Clone, Copy)]
enum Kind {
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    Text,
}

/// Runs `sql` on the server `config` names.
pub fn query(config: &Config, password: Option<String>, sql: &str) -> Result<Rows> {
    let mut config = config.clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(10));
    }
    let without_password = password.is_none();
    if let Some(p) = password {
        config.password(p);
    }
    let mut client = config.connect(NoTls).map_err(|e| {
        let why = server_message(&e);
        if without_password && why.contains("password") {
            anyhow!("cannot connect: {why}; {WHERE_PASSWORDS_GO}")
        } else {
            anyhow!("cannot connect: {why}")
        }
    })?;
    let failed = |e: postgres::Error| anyhow!("query failed: {}", server_message(&e));
    let mut transaction = client
        .build_transaction()
        .read_only(true)
        .start()
        .map_err(failed)?;
    let statement = transaction.prepare(sql).map_err(failed)?;
    let columns = statement.columns();
    let names: Vec<String> = columns.iter().map(|c| c.name().to_string()).collect();
    let kinds = columns
        .iter()
        .map(|c| kind(c.name(), c.type_()))
        .collect::<Result<Vec<_>>>()?;
    let rows = transaction.query(&statement, &[]).map_err(failed)?;
    let mut cells: Vec<Vec<Cell>> = names
        .iter()
        .map(|_| Vec::with_capacity(rows.len()))
        .collect();
    for row in &rows {
        for (i, kind) in kinds.iter().enumerate() {
            cells[i].push(
                cell(row, i, *kind)
                    .map_err(|e| anyhow!("column `{}`: {}", names[i], server_message(&e)))?,
            );
        }
    }
    Ok(Rows { names, cells })
}

/// How column `name` of type `ty` is read, or why it is not.
fn kind(name: &str, ty: &Type) -> Result<Kind> {
    Ok(match ty {
        t if *t == Type::BYTEA => bail!(
            "column `{name}` holds binary data (bytea), which cannot become text; select text, numbers or NULL"
        ),
        t if <i16 as FromSql>::accepts(t) => Kind::Int2,
        t if <i32 as FromSql>::accepts(t) => Kind::Int4,
        t if <i64 as FromSql>::accepts(t) => Kind::Int8,
        t if <f32 as FromSql>::accepts(t) => Kind::Float4,
        t if <f64 as FromSql>::accepts(t) => Kind::Float8,
        t if <String as FromSql>::accepts(t) => Kind::Text,
        t => bail!(
            "column `{name}` has type {t}, which is not read; cast it in the query: `{name}::text` (or `::float8` for numbers)"
        ),
    })
}

/// Value `i` of `row`.
fn cell(row: &Row, i: usize, kind: Kind) -> Result<Cell, postgres::Error> {
    Ok(match kind {
        Kind::Int2 => row.try_get::<_, Option<i16>>(i)?.map(i64::from).into(),
        Kind::Int4 => row.try_get::<_, Option<i32>>(i)?.map(i64::from).into(),
        Kind::Int8 => row.try_get::<_, Option<i64>>(i)?.into(),
        Kind::Float4 => row.try_get::<_, Option<f32>>(i)?.map(f64::from).into(),
        Kind::Float8 => row.try_get::<_, Option<f64>>(i)?.into(),
        Kind::Text => row.try_get::<_, Option<String>>(i)?.into(),
    })
}

/// The server's message (severity, message, detail, hint) when it sent one, else the client's
/// error with its causes.
pub fn server_message(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.to_string().replace('\n', "; ");
    }
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}
