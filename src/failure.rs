//! How a command failed, as the exit code CI reads: 0 success, 1 a gate was missed, 2 bad input
//! or usage (the default for an error), 3 a runtime failure (I/O, non-finite values), 130/143
//! interrupted by SIGINT/SIGTERM. Errors carry their kind as a context marker.

use std::fmt;

/// The kinds of failure that are not bad input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// An evaluation gate was missed (the tool itself worked).
    GateMissed,
    /// Writing output, or the computation itself, failed.
    Runtime,
    /// The run stopped on a signal (its number) after saving what it could.
    Interrupted(i32),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::GateMissed => write!(f, "evaluation gates missed"),
            Failure::Runtime => write!(f, "runtime failure"),
            Failure::Interrupted(signal) => write!(f, "interrupted by {}", signal_name(*signal)),
        }
    }
}

/// Runs `f`, a call into a library that panics on some malformed input (polars on corrupt
/// parquet pages, tokenizers on some invalid tokenizer.json settings); a panic becomes an error
/// with its message, for the caller to name the file.
pub fn caught<T>(f: impl FnOnce() -> T) -> anyhow::Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|panic| {
        let why = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("no message");
        anyhow::anyhow!("the library panicked: {why}")
    })
}

/// SIGINT or SIGTERM by name.
pub fn signal_name(signal: i32) -> &'static str {
    match signal {
        2 => "SIGINT",
        15 => "SIGTERM",
        _ => "a signal",
    }
}

/// The exit code of a failed command: the outermost marker in the error's contexts decides.
pub fn exit_code(error: &anyhow::Error) -> i32 {
    match error.downcast_ref::<Failure>() {
        Some(Failure::GateMissed) => 1,
        Some(Failure::Runtime) => 3,
        Some(Failure::Interrupted(signal)) => 128 + signal,
        None => 2,
    }
}

/// Marks an error as a runtime failure (exit code 3).
pub trait RuntimeFailure<T> {
    fn runtime(self) -> anyhow::Result<T>;
}

impl<T, E: Into<anyhow::Error>> RuntimeFailure<T> for Result<T, E> {
    fn runtime(self) -> anyhow::Result<T> {
        self.map_err(|e| e.into().context(Failure::Runtime))
    }
}
