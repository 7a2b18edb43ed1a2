//! Where a data file goes wrong, for messages: polars names a character offset or nothing when
//! it cannot read a file; these name the 1-based line of the first JSON line or csv record that
//! cannot be a row.

use serde_json::Value;
use std::collections::HashMap;

/// The first line of a JSON-lines file that is not a JSON object (or repeats a key in an
/// object), and why.
pub fn json_line_syntax(bytes: &[u8]) -> Option<(usize, String)> {
    lines(bytes).find_map(|(line, text)| match serde_json::from_slice::<Value>(text) {
        Err(e) => Some((line, not_json(&e))),
        Ok(v) if !v.is_object() => Some((
            line,
            "not a JSON object (a row is one object per line: {\"column\": value, ...})".into(),
        )),
        Ok(_) => serde_json::from_slice::<UniqueKeys>(text)
            .err()
            .map(|e| (line, format!("{} (column {})", message(&e), e.column()))),
    })
}

/// The first line of a JSON-lines file on which a field (nested fields and list elements
/// included) has another type than on an earlier line, and which field.
pub fn json_line_types(bytes: &[u8]) -> Option<(usize, String)> {
    let mut seen = HashMap::new();
    lines(bytes).find_map(|(line, text)| {
        let row = serde_json::from_slice::<Value>(text).ok()?;
        conflict(&row, "", line, &mut seen).map(|why| (line, why))
    })
}

/// The non-blank lines of a file with their 1-based numbers.
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, &[u8])> {
    bytes
        .split(|&b| b == b'\n')
        .enumerate()
        .filter(|(_, text)| !blank(text))
        .map(|(i, text)| (i + 1, text))
}

/// Whether `text` is JSON whitespace only (a form feed is not).
pub fn blank(text: &[u8]) -> bool {
    text.iter()
        .all(|b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'))
}

/// serde_json's message for one line: it counts lines within that line, so only the column stays.
fn not_json(e: &serde_json::Error) -> String {
    format!("not valid JSON at column {}: {}", e.column(), message(e))
}

/// serde_json's message without its position.
fn message(e: &serde_json::Error) -> String {
    let msg = e.to_string();
    msg.split(" at line ").next().unwrap_or(&msg).to_string()
}

/// Any JSON value whose objects name each key once (serde_json's `Value` keeps the last of
/// repeated keys; polars refuses them).
struct UniqueKeys;

impl<'de> serde::Deserialize<'de> for UniqueKeys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueKeys)
    }
}

impl<'de> serde::de::Visitor<'de> for UniqueKeys {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(self)
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut items: A) -> Result<Self, A::Error> {
        while items.next_element::<UniqueKeys>()?.is_some() {}
        Ok(self)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut fields: A) -> Result<Self, A::Error> {
        let mut keys = std::collections::HashSet::new();
        while let Some(key) = fields.next_key::<String>()? {
            if !keys.insert(key.clone()) {
                return Err(serde::de::Error::custom(format!(
                    "the key `{key}` appears twice in one object"
                )));
            }
            fields.next_value::<UniqueKeys>()?;
        }
        Ok(self)
    }
}

/// A JSON value's type in words; null fits every type.
fn kind(v: &Value) -> Option<&'static str> {
    match v {
        Value::Null => None,
        Value::Bool(_) => Some("true/false"),
        Value::Number(_) => Some("a number"),
        Value::String(_) => Some("text"),
        Value::Array(_) => Some("a list"),
        Value::Object(_) => Some("an object"),
    }
}

/// The first field of `v` (at `path`, `a.b[]` for the elements of list `a.b`) whose type
/// differs from the one an earlier line gave it (`seen`: path → type and line).
fn conflict(
    v: &Value,
    path: &str,
    line: usize,
    seen: &mut HashMap<String, (&'static str, usize)>,
) -> Option<String> {
    let kind = kind(v)?;
    let (first, at) = *seen.entry(path.to_string()).or_insert((kind, line));
    if first != kind {
        return Some(format!("`{path}` is {kind} here, but {first} on line {at}"));
    }
    match v {
        Value::Object(fields) => fields.iter().find_map(|(k, field)| {
            let path = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            conflict(field, &path, line, seen)
        }),
        Value::Array(items) => items
            .iter()
            .find_map(|item| conflict(item, &format!("{path}[]"), line, seen)),
        _ => None,
    }
}

/// The first csv record whose number of fields differs from the first record's, or the line on
/// which a quoted field opens that never closes; by 1-based line. A quote opens a quoted field
/// only at the start of a field (elsewhere it is text), a doubled quote inside one is a quote;
/// blank lines are skipped.
pub fn csv_record(bytes: &[u8], delimiter: u8, quote: Option<u8>) -> Option<(usize, String)> {
    let (mut line, mut record_line, mut quote_line) = (1, 1, 1);
    let (mut fields, mut blank, mut field_start) = (1, true, true);
    let (mut in_quotes, mut just_closed) = (false, false);
    let mut expected = None;
    let mut end_record = |fields: usize, at: usize| -> Option<(usize, String)> {
        let n = *expected.get_or_insert(fields);
        (n != fields).then(|| (at, format!("{fields} fields, but the first line has {n}")))
    };
    for &b in bytes {
        let escaped_quote = std::mem::take(&mut just_closed);
        if in_quotes {
            if Some(b) == quote {
                (in_quotes, just_closed) = (false, true);
            } else if b == b'\n' {
                line += 1;
            }
            continue;
        }
        if Some(b) == quote && (field_start || escaped_quote) {
            if field_start {
                quote_line = line;
            }
            in_quotes = true;
            (blank, field_start) = (false, false);
        } else if b == b'\n' {
            if !blank {
                if let Some(bad) = end_record(fields, record_line) {
                    return Some(bad);
                }
            }
            line += 1;
            (record_line, fields, blank, field_start) = (line, 1, true, true);
        } else if b == delimiter {
            fields += 1;
            (blank, field_start) = (false, true);
        } else if b != b'\r' {
            (blank, field_start) = (false, false);
        }
    }
    if in_quotes {
        return Some((
            quote_line,
            "a quoted field opens here and never closes".into(),
        ));
    }
    if blank {
        return None;
    }
    end_record(fields, record_line)
}
