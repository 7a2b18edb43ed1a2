//! The text encodings of csv, tsv and text sources, decoded to UTF-8 before Polars reads them:
//! `utf8` (strict), `utf8-lossy` (invalid bytes replaced, and counted), `windows-1252` (what
//! Excel's "CSV" export writes on German Windows), `latin-1` (ISO-8859-1), `utf-16` (byte-order
//! mark, else little-endian) and `auto` (a byte-order mark, else valid UTF-8, else Windows-1252).

use anyhow::{bail, Result};
use std::path::Path;

/// A file's text and how it was read.
#[derive(Debug)]
pub struct Decoded {
    pub text: String,
    /// The encoding the bytes were read as (for `auto`, the one it chose).
    pub encoding: &'static str,
    /// Invalid sequences replaced by U+FFFD (`utf8-lossy` only).
    pub replaced: usize,
}

/// The encodings a source may name.
pub const SUPPORTED: &str = "utf8, utf8-lossy, windows-1252, latin-1, utf-16, auto";

/// Decodes `bytes` of `path` (named in errors) as `encoding` (default `utf8`).
pub fn decode(path: &Path, bytes: Vec<u8>, encoding: Option<&str>) -> Result<Decoded> {
    let plain = |text, encoding| Decoded {
        text,
        encoding,
        replaced: 0,
    };
    let label = encoding.unwrap_or("utf8").to_ascii_lowercase();
    Ok(match label.as_str() {
        "utf8" | "utf-8" => plain(strict_utf8(path, bytes)?, "utf-8"),
        "utf8-lossy" => {
            let replaced = bytes
                .utf8_chunks()
                .filter(|c| !c.invalid().is_empty())
                .count();
            Decoded {
                text: String::from_utf8_lossy(strip_utf8_bom(&bytes)).into_owned(),
                encoding: "utf-8 (lossy)",
                replaced,
            }
        }
        "windows-1252" | "cp1252" => plain(windows_1252(&bytes), "windows-1252"),
        "latin-1" | "latin1" | "iso-8859-1" => {
            plain(bytes.iter().map(|&b| char::from(b)).collect(), "latin-1")
        }
        "utf-16" | "utf16" => utf16(path, &bytes)?,
        "auto" => {
            if bytes.starts_with(&[0xFF, 0xFE]) || bytes.starts_with(&[0xFE, 0xFF]) {
                utf16(path, &bytes)?
            } else if std::str::from_utf8(&bytes).is_ok() {
                plain(strict_utf8(path, bytes)?, "utf-8")
            } else {
                plain(windows_1252(&bytes), "windows-1252")
            }
        }
        other => bail!(
            "{}: encoding `{other}` is not supported; use one of {SUPPORTED}",
            path.display()
        ),
    })
}

fn strip_utf8_bom(bytes: &[u8]) -> &[u8] {
    bytes.strip_prefix(&[0xEF, 0xBB, 0xBF]).unwrap_or(bytes)
}

fn strict_utf8(path: &Path, bytes: Vec<u8>) -> Result<String> {
    match std::str::from_utf8(strip_utf8_bom(&bytes)) {
        Ok(text) => Ok(text.to_string()),
        Err(e) => {
            let good = &strip_utf8_bom(&bytes)[..e.valid_up_to()];
            let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
            bail!(
                "{} is not valid UTF-8 (line {line}); set encoding = \"windows-1252\" (Excel's CSV on Windows), \"latin-1\", \"utf-16\" or \"auto\" on the source, or re-encode it as UTF-8",
                path.display()
            )
        }
    }
}

fn windows_1252(bytes: &[u8]) -> String {
    encoding_rs::WINDOWS_1252
        .decode_without_bom_handling(bytes)
        .0
        .into_owned()
}

fn utf16(path: &Path, bytes: &[u8]) -> Result<Decoded> {
    let (encoding, body, name) = match bytes {
        [0xFE, 0xFF, rest @ ..] => (encoding_rs::UTF_16BE, rest, "utf-16be"),
        [0xFF, 0xFE, rest @ ..] => (encoding_rs::UTF_16LE, rest, "utf-16le"),
        rest => (encoding_rs::UTF_16LE, rest, "utf-16le (no byte-order mark)"),
    };
    let (text, had_errors) = encoding.decode_without_bom_handling(body);
    if had_errors {
        bail!(
            "{} is not valid {name}: it has an odd length or unpaired surrogates",
            path.display()
        );
    }
    Ok(Decoded {
        text: text.into_owned(),
        encoding: name,
        replaced: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_encoding() {
        let p = Path::new("x.csv");
        let text = "Grundgebühr 12,50 € für Maß";
        let cp1252: Vec<u8> = encoding_rs::WINDOWS_1252.encode(text).0.into_owned();
        assert_eq!(
            decode(p, cp1252.clone(), Some("windows-1252"))
                .unwrap()
                .text,
            text
        );
        let auto = decode(p, cp1252, Some("auto")).unwrap();
        assert_eq!((auto.text.as_str(), auto.encoding), (text, "windows-1252"));
        let mut utf16 = vec![0xFF, 0xFE];
        utf16.extend(text.encode_utf16().flat_map(|u| u.to_le_bytes()));
        let auto = decode(p, utf16, Some("auto")).unwrap();
        assert_eq!((auto.text.as_str(), auto.encoding), (text, "utf-16le"));
        let latin1: Vec<u8> = "Maß über".chars().map(|c| c as u8).collect();
        assert_eq!(decode(p, latin1, Some("latin-1")).unwrap().text, "Maß über");
        let lossy = decode(p, b"a\xffb\xfe".to_vec(), Some("utf8-lossy")).unwrap();
        assert_eq!(lossy.replaced, 2);
        let err = decode(p, b"ok\n\xfc".to_vec(), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 2") && err.contains("windows-1252"),
            "{err}"
        );
    }
}
