//! The upload's progress as hf-hub reports it (bytes until the commit call), shown as
//! [`crate::progress`] shows long work: a bar on a terminal, log lines otherwise.

use hf_hub::progress::{ProgressEvent, ProgressHandler, UploadEvent};
use std::sync::{Mutex, PoisonError};

use crate::progress::{Progress, Unit};

/// Shows one commit's upload to `repo`.
pub struct UploadProgress {
    repo: String,
    shown: Mutex<Option<(Progress, u64)>>,
}

impl UploadProgress {
    pub fn new(repo: &str) -> Self {
        Self {
            repo: repo.to_string(),
            shown: Mutex::new(None),
        }
    }
}

impl ProgressHandler for UploadProgress {
    fn on_progress(&self, event: &ProgressEvent) {
        let ProgressEvent::Upload(event) = event else {
            return;
        };
        let mut shown = self.shown.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            UploadEvent::Start {
                total_files,
                total_bytes,
            } => {
                let what = format!("uploading {total_files} files to {}", self.repo);
                *shown = Some((Progress::new(what, *total_bytes, Unit::Bytes), *total_bytes));
            }
            UploadEvent::Progress {
                bytes_completed, ..
            } => {
                if let Some((progress, _)) = shown.as_ref() {
                    progress.set(*bytes_completed);
                }
            }
            UploadEvent::Committing => {
                if let Some((progress, total)) = shown.take() {
                    progress.set(total);
                    progress.finish();
                }
            }
            UploadEvent::Complete => {
                if let Some((progress, _)) = shown.take() {
                    progress.finish();
                }
            }
        }
    }
}
