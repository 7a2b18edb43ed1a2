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
