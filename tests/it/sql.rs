//! SQL sources: an SQLite database written with rusqlite and a real PostgreSQL server (see
//! [`super::pg_server`]) read through the data stage: integers, floats, text and NULLs as polars
//! columns, umlauts byte for byte, validation sources, `data inspect` and `train` through the
//! binary, and every bad query, missing table, binary column and password in a connection named
//! by its source.

use feinschliff::data::inspect::report_text;
use feinschliff::data::sql;
use feinschliff::recipe::Recipe;
use polars::prelude::*;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::common::tiny_llama_dir;
use super::data::{prepare, tokenizer};
use super::pg_server::{PgServer, PASSWORD};

const ANSWER: &str = "Sie beträgt 12,50 € im Monat – für Maß und Öl.";
const DISCOUNT: &str = "Ja, 20 % – mit gültigem Ausweis.";
const HOURS: &str = "Mo–Fr 8–18 Uhr, außer an Feiertagen.";

/// The FAQ rows of both databases: id, question, answer, points (float), count (integer), note,
/// as SQL literals. Row 3 has no answer.
const ROWS: &str = "(1, 'Wie hoch ist die Grundgebühr?', 'Sie beträgt 12,50 € im Monat – für Maß und Öl.', 4.5, 3000000000, NULL), \
     (2, 'Gibt es Rabatt für Studierende?', 'Ja, 20 % – mit gültigem Ausweis.', NULL, 7, 'geprüft'), \
     (3, 'Wo ist das Büro?', NULL, 2, NULL, NULL), \
     (4, 'Öffnungszeiten?', 'Mo–Fr 8–18 Uhr, außer an Feiertagen.', 1.25, 1, NULL)";

/// `daten/faq.db`: the FAQ rows, plus a BLOB column.
fn sqlite_db(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir.join("daten")).unwrap();
    let path = dir.join("daten/faq.db");
    let db = rusqlite::Connection::open(&path).unwrap();
    db.execute_batch(&format!(
        "CREATE TABLE faq (id INTEGER PRIMARY KEY, frage TEXT, antwort TEXT, punkte REAL, anzahl INTEGER, notiz TEXT);
         INSERT INTO faq VALUES {ROWS};
         ALTER TABLE faq ADD COLUMN bild BLOB;
         UPDATE faq SET bild = X'00FF' WHERE id = 2;"
    ))
    .unwrap();
    path
}

/// A recipe in `dir` whose data is `sources` (`[[data.train]]` tables), loaded and validated.
fn recipe(dir: &Path, sources: &str) -> anyhow::Result<Recipe> {
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe_text(sources)).unwrap();
    Recipe::load(&path, &[])
}

fn recipe_text(sources: &str) -> String {
    format!(
        "[model]\nbase = \"{}\"\n\n[data]\nformat = \"instruction\"\nvalidation_fraction = 0.0\n{sources}\n\n[train]\nmax_steps = 1\nbatch_size = 2\ndevice = \"cpu\"\n\n[output]\ndir = \"out\"\n",
        tiny_llama_dir().display()
    )
}

fn source(sql: &str, connection: &str) -> String {
    format!("[[data.train]]\nsql = \"{sql}\"\nconnection = \"{connection}\"\n")
}

/// The frame of a recipe's only source.
fn frame(recipe: &Recipe) -> DataFrame {
    sql::read(recipe, &recipe.data.train[0]).unwrap_or_else(|e| panic!("{e:#}"))
}

fn texts(df: &DataFrame, name: &str) -> Vec<Option<String>> {
    let c = df.column(name).unwrap_or_else(|e| panic!("{e}: {df}"));
    c.str()
        .unwrap_or_else(|e| panic!("{name}: {e}"))
        .iter()
        .map(|v| v.map(str::to_string))
        .collect()
}

fn some(values: &[&str]) -> Vec<Option<String>> {
    values.iter().map(|v| Some(v.to_string())).collect()
}

/// The FAQ columns read back: each type, the NULLs, and the text byte for byte.
fn assert_faq_frame(df: &DataFrame) {
    assert_eq!(df.height(), 4, "{df}");
    let ids: Vec<Option<i64>> = df.column("id").unwrap().i64().unwrap().iter().collect();
    assert_eq!(ids, [Some(1), Some(2), Some(3), Some(4)]);
    let counts: Vec<Option<i64>> = df.column("anzahl").unwrap().i64().unwrap().iter().collect();
    assert_eq!(counts, [Some(3_000_000_000), Some(7), None, Some(1)]);
    let points: Vec<Option<f64>> = df.column("punkte").unwrap().f64().unwrap().iter().collect();
    assert_eq!(points, [Some(4.5), None, Some(2.0), Some(1.25)]);
    let answers = texts(df, "antwort");
    assert_eq!(
        answers,
        [
            Some(ANSWER.into()),
            Some(DISCOUNT.into()),
            None,
            Some(HOURS.into())
        ]
    );
    assert_eq!(
        answers[0].as_deref().unwrap().as_bytes(),
        ANSWER.as_bytes(),
        "umlauts, ß, € and – byte for byte"
    );
    assert_eq!(
        texts(df, "frage")[2].as_deref().unwrap().as_bytes(),
        "Wo ist das Büro?".as_bytes()
    );
    assert_eq!(
        texts(df, "notiz"),
        [None, Some("geprüft".into()), None, None]
    );
}

const FAQ_COLUMNS: &str = "SELECT id, frage, antwort, punkte, anzahl, notiz FROM faq ORDER BY id";
const INSTRUCTIONS: &str =
    "SELECT frage AS instruction, antwort AS output FROM faq WHERE antwort IS NOT NULL ORDER BY id";

#[test]
fn sqlite_rows_keep_their_types_nulls_and_umlauts() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let r = recipe(dir.path(), &source(FAQ_COLUMNS, "sqlite://daten/faq.db")).unwrap();
    assert_faq_frame(&frame(&r));

    // A column of NULLs only; a column that mixes text and numbers (SQLite allows it) is text.
    let mixed = "SELECT NULL AS leer, CASE WHEN id = 1 THEN 'eins' ELSE id END AS gemischt, punkte * 2 AS doppelt FROM faq ORDER BY id";
    let absolute = format!("sqlite://{}", dir.path().join("daten/faq.db").display());
    let df = frame(&recipe(dir.path(), &source(mixed, &absolute)).unwrap());
    assert_eq!(df.column("leer").unwrap().dtype(), &DataType::Null);
    assert_eq!(df.column("leer").unwrap().len(), 4);
    assert_eq!(texts(&df, "gemischt"), some(&["eins", "2", "3", "4"]));
    assert_eq!(df.column("doppelt").unwrap().dtype(), &DataType::Float64);
}

#[test]
fn sqlite_rows_flow_into_the_instruction_format() {
    let dir = tempfile::tempdir().unwrap();
    sqlite_db(dir.path());
    let p = prepare(
        dir.path(),
        &format!(
            "format = \"instruction\"\n{}[[data.validation]]\nsql = \"SELECT 'Wann öffnet das Büro?' AS instruction, 'Um 8 Uhr.' AS output\"\nconnection = \"sqlite://daten/faq.db\"\n",
            source(INSTRUCTIONS, "sqlite://daten/faq.db")
        ),
    )
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(p.report.train_sources[0].rows_read, 3);
    assert_eq!((p.train.len(), p.validation.len()), (3, 1));
    let tok = tokenizer();
    let decoded: Vec<String> = p
        .train
        .iter()
        .map(|e| tok.decode(&e.input_ids).unwrap())
        .collect();
    assert!(decoded.iter().any(|t| t.contains(ANSWER)), "{decoded:#?}");
    let report = report_text(&p.report, 512);
    assert!(
        report.contains("train sqlite://daten/faq.db: 3 rows read, 3 samples kept")
            && report.contains("validation sqlite://daten/faq.db: 1 rows read, 1 samples kept"),
        "{report}"
    );
}

#[test]
fn bad_sqlite_sources_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let db = sqlite_db(dir.path());
    let err = |sql: &str, connection: &str| {
        let e = prepare(
            dir.path(),
            &format!("format = \"instruction\"\n{}", source(sql, connection)),
        );
        format!("{:#}", e.err().expect("the source fails"))
    };
    let conn = "sqlite://daten/faq.db";
    let named = |msg: &str| {
        msg.contains("recipe.toml") && msg.contains("[[data.train]] 1 (sqlite://daten/faq.db)")
    };

    let syntax = err("SELEKT frage FROM faq", conn);
    assert!(
        named(&syntax) && syntax.contains("syntax error"),
        "{syntax}"
    );
    let missing = err("SELECT frage FROM fehlt", conn);
    assert!(
        named(&missing) && missing.contains("no such table: fehlt"),
        "{missing}"
    );
    let blob = err(
        "SELECT frage AS instruction, antwort AS output, bild FROM faq",
        conn,
    );
    assert!(
        named(&blob) && blob.contains("column `bild`") && blob.contains("BLOB"),
        "{blob}"
    );
    let twice = err(
        "SELECT frage AS instruction, antwort AS instruction FROM faq",
        conn,
    );
    assert!(
        named(&twice) && twice.contains("`instruction`") && twice.contains("AS"),
        "{twice}"
    );
    let unmapped = err("SELECT frage, antwort FROM faq", conn);
    assert!(
        named(&unmapped)
            && unmapped.contains("no column `instruction`")
            && unmapped.contains("frage, antwort"),
        "{unmapped}"
    );

    // Opened read-only: a statement that writes fails and changes nothing.
    let write = err("DELETE FROM faq", conn);
    assert!(named(&write) && write.contains("readonly"), "{write}");
    let rows: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM faq", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 4);

    // A missing database is named and not created; a file that is no database is named too.
    let absent = err(INSTRUCTIONS, "sqlite://daten/fehlt.db");
    assert!(
        absent.contains("[[data.train]] 1 (sqlite://daten/fehlt.db)")
            && absent.contains("fehlt.db does not exist"),
        "{absent}"
    );
    assert!(!dir.path().join("daten/fehlt.db").exists());
    std::fs::write(
        dir.path().join("daten/kaputt.db"),
        "keine Datenbank, nur Text",
    )
    .unwrap();
    let corrupt = err(INSTRUCTIONS, "sqlite://daten/kaputt.db");
    assert!(
        corrupt.contains("kaputt.db") && corrupt.contains("not a database"),
        "{corrupt}"
    );
}

#[test]
fn bad_sql_keys_are_refused_when_the_recipe_loads() {
    let dir = tempfile::tempdir().unwrap();
    let err = |sources: &str| format!("{:#}", recipe(dir.path(), sources).expect_err("refused"));

    for written in [
        "postgres://anna:geheim@localhost:5432/faq",
        "postgresql://anna@localhost/faq?password=geheim",
    ] {
        let e = err(&source("SELECT 1", written));
        assert!(
            e.contains("[[data.train]] 1")
                && e.contains("holds a password")
                && e.contains("PGPASSWORD")
                && e.contains("password_file")
                && e.contains(".pgpass")
                && !e.contains("geheim"),
            "{e}"
        );
    }
    let one = |connection: &str| source("SELECT 1", connection);
    let cases = [
        (
            "[[data.train]]\nsql = \"SELECT 1\"\n".to_string(),
            "needs a `connection`",
        ),
        (
            "[[data.train]]\npath = \"faq.csv\"\nconnection = \"sqlite://faq.db\"\n".into(),
            "belong to SQL sources",
        ),
        (
            format!("{}path = \"faq.csv\"\n", one("sqlite://faq.db")),
            "exactly one of `path`, `hub` and `sql`",
        ),
        (
            "[[data.train]]\nsql = \"  \"\nconnection = \"sqlite://faq.db\"\n".into(),
            "`sql` is empty",
        ),
        (
            format!("{}delimiter = \";\"\n", one("sqlite://faq.db")),
            "`delimiter` applies to files",
        ),
        (
            format!("{}password_file = \"pw\"\n", one("sqlite://faq.db")),
            "SQLite has no password",
        ),
        (
            one("mysql://anna@localhost/faq"),
            "neither sqlite://FILE nor postgres://",
        ),
        (one("postgres://localhost/faq"), "names no user"),
        (one("sqlite://"), "names no database file"),
    ];
    for (sources, expected) in cases {
        let e = err(&sources);
        assert!(
            e.contains("recipe.toml") && e.contains(expected),
            "{expected}: {e}"
        );
    }
}

/// `feinschliff ARGS` in `dir` with `env` set and PostgreSQL's password variables removed (HOME is
/// `dir`, so no ~/.pgpass of this machine is read).
fn feinschliff(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_feinschliff"));
    command
        .args(args)
        .current_dir(dir)
        .env_remove("PGPASSWORD")
        .env_remove("PGPASSFILE")
        .env("HOME", dir);
    for (k, v) in env {
        command.env(k, v);
    }
    command.output().unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn postgres_source_reads_from_a_real_server() {
    let server = match PgServer::start() {
        Ok(Some(server)) => server,
        Ok(None) => return,
        Err(e) => panic!("{e}"),
    };
    server.execute("postgres", "CREATE DATABASE faq");
    server.execute(
        "faq",
        &format!(
            "CREATE TABLE faq (id int4, frage text, antwort varchar(200), punkte float8, anzahl int8, notiz text, \
             klein int2, gewicht real, bild bytea, preis numeric);
             INSERT INTO faq (id, frage, antwort, punkte, anzahl, notiz) VALUES {ROWS};
             UPDATE faq SET klein = id - 3, gewicht = id / 4.0, bild = '\\x00ff', preis = 12.50 WHERE id = 1;"
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let conn = format!("postgres://feinschliff@127.0.0.1:{}/faq", server.port);
    std::fs::write(dir.join("pw.txt"), format!("{PASSWORD}\n")).unwrap();
    let with_file = |sql: &str| format!("{}password_file = \"pw.txt\"\n", source(sql, &conn));

    // In the process, with the password from `password_file`.
    let r = recipe(dir, &with_file(FAQ_COLUMNS)).unwrap();
    assert_faq_frame(&frame(&r));
    let small = frame(
        &recipe(
            dir,
            &with_file("SELECT klein, gewicht FROM faq ORDER BY id"),
        )
        .unwrap(),
    );
    let small_ints: Vec<Option<i64>> = small
        .column("klein")
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(small_ints, [Some(-2), None, None, None]);
    let reals: Vec<Option<f64>> = small
        .column("gewicht")
        .unwrap()
        .f64()
        .unwrap()
        .iter()
        .collect();
    assert_eq!(reals, [Some(0.25), None, None, None]);
    let resolved = r.to_toml().unwrap();
    assert!(
        resolved.contains(&conn) && !resolved.contains(PASSWORD),
        "{resolved}"
    );

    let err = |sources: &str| {
        let e = prepare(dir, &format!("format = \"instruction\"\n{sources}"));
        format!("{:#}", e.err().expect("the source fails"))
    };
    let named = |msg: &str| msg.contains(&format!("[[data.train]] 1 ({conn})"));
    let missing = err(&with_file("SELECT frage FROM fehlt"));
    assert!(
        named(&missing) && missing.contains("relation \"fehlt\" does not exist"),
        "{missing}"
    );
    let syntax = err(&with_file("SELEKT 1"));
    assert!(
        named(&syntax) && syntax.contains("syntax error at or near \"SELEKT\""),
        "{syntax}"
    );
    let bytea = err(&with_file(
        "SELECT frage AS instruction, bild AS output FROM faq",
    ));
    assert!(
        named(&bytea) && bytea.contains("column `output` holds binary data (bytea)"),
        "{bytea}"
    );
    let numeric = err(&with_file("SELECT frage AS instruction, preis FROM faq"));
    assert!(
        named(&numeric)
            && numeric.contains("column `preis` has type numeric")
            && numeric.contains("preis::text"),
        "{numeric}"
    );
    let write = err(&with_file("DELETE FROM faq"));
    assert!(
        named(&write) && write.contains("read-only transaction"),
        "{write}"
    );
    std::fs::write(dir.join("falsch.txt"), "falsch").unwrap();
    let wrong = err(&format!(
        "{}password_file = \"falsch.txt\"\n",
        source(INSTRUCTIONS, &conn)
    ));
    assert!(
        named(&wrong) && wrong.contains("password authentication failed for user \"feinschliff\""),
        "{wrong}"
    );

    // Through the binary, with the password from PGPASSWORD: data inspect, then a training run.
    std::fs::write(
        dir.join("recipe.toml"),
        recipe_text(&source(INSTRUCTIONS, &conn)),
    )
    .unwrap();
    let inspect = feinschliff(
        dir,
        &["data", "inspect", "recipe.toml"],
        &[("PGPASSWORD", PASSWORD)],
    );
    let (out, log) = (text(&inspect.stdout), text(&inspect.stderr));
    assert!(inspect.status.success(), "{out}\n{log}");
    assert!(
        out.contains(&format!("train {conn}: 3 rows read, 3 samples kept")),
        "{out}"
    );
    assert!(
        out.contains(ANSWER) || out.contains(DISCOUNT) || out.contains(HOURS),
        "{out}"
    );
    assert!(!out.contains(PASSWORD) && !log.contains(PASSWORD));

    let train = feinschliff(dir, &["train", "recipe.toml"], &[("PGPASSWORD", PASSWORD)]);
    assert!(train.status.success(), "{}", text(&train.stderr));
    let resolved = std::fs::read_to_string(dir.join("out/recipe.resolved.toml")).unwrap();
    assert!(
        resolved.contains(&conn) && !resolved.contains(PASSWORD),
        "{resolved}"
    );

    // From a password file (PGPASSFILE), only when only its owner may read it.
    let pgpass = dir.join("pgpass");
    std::fs::write(
        &pgpass,
        format!(
            "# Kommentar\nanderswo:*:*:*:nein\n127.0.0.1:{}:faq:feinschliff:{PASSWORD}\n",
            server.port
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o600)).unwrap();
    let passfile = pgpass.to_str().unwrap();
    let from_file = feinschliff(
        dir,
        &["data", "inspect", "recipe.toml"],
        &[("PGPASSFILE", passfile)],
    );
    assert!(from_file.status.success(), "{}", text(&from_file.stderr));

    // A wrong password and none at all: exit code 2, the source and the server's message named.
    let wrong = feinschliff(
        dir,
        &["data", "inspect", "recipe.toml"],
        &[("PGPASSWORD", "falsch")],
    );
    let log = text(&wrong.stderr);
    assert_eq!(wrong.status.code(), Some(2), "{log}");
    assert!(
        named(&log) && log.contains("password authentication failed"),
        "{log}"
    );
    std::fs::set_permissions(&pgpass, std::fs::Permissions::from_mode(0o644)).unwrap();
    let none = feinschliff(
        dir,
        &["data", "inspect", "recipe.toml"],
        &[("PGPASSFILE", passfile)],
    );
    let log = text(&none.stderr);
    assert_eq!(none.status.code(), Some(2), "{log}");
    assert!(
        named(&log)
            && log.contains("password missing")
            && log.contains("PGPASSWORD")
            && log.contains("chmod 600"),
        "{log}"
    );
}
