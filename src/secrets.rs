//! Keeps the Hugging Face token out of everything Feinschliff prints: errors, log lines and panic
//! messages pass through [`redact`], which replaces the token's text wherever it appears (an
//! error body that echoes a request header, a URL with credentials).

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

/// What stands where a token was.
pub const REDACTED: &str = "hf_***";

/// The token values hf-hub would use: HF_TOKEN, and the file at HF_TOKEN_PATH or $HF_HOME/token.
fn secrets() -> &'static [String] {
    static SECRETS: OnceLock<Vec<String>> = OnceLock::new();
    SECRETS.get_or_init(|| {
        let file = std::env::var_os("HF_TOKEN_PATH")
            .map(PathBuf::from)
            .unwrap_or_else(|| hf_hub::hf_home().join("token"));
        [
            std::env::var("HF_TOKEN").ok(),
            std::fs::read_to_string(file).ok(),
        ]
        .into_iter()
        .flatten()
        .map(|t| t.trim().to_string())
        // Too short to be a token; replacing it would garble ordinary text.
        .filter(|t| t.len() >= 8)
        .collect()
    })
}

/// `text` with every token value replaced by [`REDACTED`].
pub fn redact(text: &str) -> String {
    secrets().iter().fold(text.to_string(), |t, secret| {
        t.replace(secret.as_str(), REDACTED)
    })
}

/// stderr, redacted: for the log subscriber.
pub struct RedactedStderr;

impl Write for RedactedStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = redact(&String::from_utf8_lossy(buf));
        std::io::stderr().write_all(text.as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// Panic messages go through [`redact`] too.
pub fn redact_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        let location = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!("feinschliff panicked{location}: {}", redact(&message));
    }));
}
