//! Progress of long work (loading weights, tokenizing, merging, uploading): a bar on a terminal,
//! plain log lines when stderr is not one (CI logs, files). Lines come at most every few seconds
//! and a closing line only after work that took that long, so quick work prints nothing.

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often a log line reports progress when there is no bar.
const LINE_EVERY: Duration = Duration::from_secs(5);

/// What a progress counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Things, named in the plural (`tensors`, `samples`).
    Items(&'static str),
    Bytes,
}

impl Unit {
    fn count(self, n: u64) -> String {
        match self {
            Unit::Items(name) => format!("{n} {name}"),
            Unit::Bytes => HumanBytes(n).to_string(),
        }
    }
}

/// The progress of one piece of work; usable from several threads.
pub struct Progress {
    what: String,
    unit: Unit,
    total: u64,
    done: AtomicU64,
    view: View,
}

enum View {
    Bar(ProgressBar),
    Lines {
        every: Duration,
        started: Instant,
        last: Mutex<Instant>,
        logged: AtomicBool,
    },
}

impl Progress {
    /// Progress of `what` over `total` units: a bar when stderr is a terminal, else log lines.
    pub fn new(what: impl Into<String>, total: u64, unit: Unit) -> Self {
        if std::io::stderr().is_terminal() {
            Self::bar(what.into(), total, unit)
        } else {
            Self::lines(what.into(), total, unit, LINE_EVERY)
        }
    }

    fn bar(what: String, total: u64, unit: Unit) -> Self {
        let bar = ProgressBar::new(total);
        let counts = match unit {
            Unit::Items(name) => format!("{{pos}}/{{len}} {name}"),
            Unit::Bytes => "{bytes}/{total_bytes}".to_string(),
        };
        if let Ok(style) = ProgressStyle::with_template(&format!(
            "{{msg}} {{bar:30}} {counts} [{{elapsed_precise}}<{{eta_precise}}]"
        )) {
            bar.set_style(style);
        }
        bar.set_message(what.clone());
        Self {
            what,
            unit,
            total,
            done: AtomicU64::new(0),
            view: View::Bar(bar),
        }
    }

    fn lines(what: String, total: u64, unit: Unit, every: Duration) -> Self {
        let now = Instant::now();
        Self {
            what,
            unit,
            total,
            done: AtomicU64::new(0),
            view: View::Lines {
                every,
                started: now,
                last: Mutex::new(now),
                logged: AtomicBool::new(false),
            },
        }
    }

    /// `n` more units are done.
    pub fn inc(&self, n: u64) {
        let done = self.done.fetch_add(n, Ordering::Relaxed) + n;
        self.show(done);
    }

    /// `done` units are done in all (for work that reports totals, like an upload).
    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.show(done);
    }

    fn show(&self, done: u64) {
        match &self.view {
            View::Bar(bar) => bar.set_position(done),
            View::Lines {
                every,
                last,
                logged,
                ..
            } => {
                let mut last = last.lock().unwrap_or_else(PoisonError::into_inner);
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    logged.store(true, Ordering::Relaxed);
                    let percent = if self.total > 0 {
                        100.0 * done as f64 / self.total as f64
                    } else {
                        100.0
                    };
                    tracing::info!(
                        "{}: {} of {} ({percent:.0} %)",
                        self.what,
                        self.unit.count(done),
                        self.unit.count(self.total)
                    );
                }
            }
        }
    }

    /// The work is over: the bar is cleared; a closing line follows the lines, if there were any.
    pub fn finish(&self) {
        match &self.view {
            View::Bar(bar) => bar.finish_and_clear(),
            View::Lines {
                started, logged, ..
            } => {
                if logged.load(Ordering::Relaxed) {
                    tracing::info!(
                        "{}: {} in {:.1} s",
                        self.what,
                        self.unit.count(self.done.load(Ordering::Relaxed)),
                        started.elapsed().as_secs_f64()
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// The log lines written while `f` runs.
    fn logged(f: impl FnOnce()) -> String {
        #[derive(Clone, Default)]
        struct Buffer(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buffer {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, f);
        let bytes = buffer.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn lines_report_the_counts_and_close_with_the_total() {
        let out = logged(|| {
            let p = Progress::lines(
                "tokenizing".into(),
                4,
                Unit::Items("samples"),
                Duration::ZERO,
            );
            p.inc(1);
            p.inc(3);
            p.finish();
        });
        assert!(
            out.contains("tokenizing: 1 samples of 4 samples (25 %)"),
            "{out}"
        );
        assert!(
            out.contains("tokenizing: 4 samples of 4 samples (100 %)"),
            "{out}"
        );
        assert!(out.contains("tokenizing: 4 samples in "), "{out}");
        let out = logged(|| {
            let p = Progress::lines("uploading".into(), 2048, Unit::Bytes, Duration::ZERO);
            p.set(1024);
            p.finish();
        });
        assert!(
            out.contains("uploading: 1.00 KiB of 2.00 KiB (50 %)"),
            "{out}"
        );
    }

    #[test]
    fn quick_work_prints_nothing() {
        let out = logged(|| {
            let p = Progress::lines("tokenizing".into(), 4, Unit::Items("samples"), LINE_EVERY);
            p.inc(4);
            p.finish();
        });
        assert_eq!(out, "");
    }
}
