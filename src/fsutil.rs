//! File-system helpers: writes that never leave half-written output behind, and reads of text
//! files whose errors say where the file stops being text.

use anyhow::{anyhow, bail, Context, Result};
use std::path::{Path, PathBuf};

use crate::failure::RuntimeFailure;

/// The text of `path`, which must be UTF-8; `what` names the kind of file in messages
/// (`recipe`, `model config`). Invalid UTF-8 is an error naming the line and column (in bytes)
/// of the first bad byte.
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
        anyhow!(
            "{what} {} is not valid UTF-8 at line {}, column {}: save it as UTF-8",
            path.display(),
            good.iter().filter(|&&b| b == b'\n').count() + 1,
            good.len() - line_start + 1
        )
    })
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename; on failure
/// (a full disk) the temporary file is removed and `path` is as it was. A runtime failure.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    let written = write_synced(&tmp, bytes)
        .with_context(|| format!("cannot write {}", path.display()))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.runtime()
}

/// Writes and flushes a file to the disk, so that a rename after it never exposes a short file.
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = std::fs::File::create(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// An output folder that is filled under a temporary name and appears under its real name only
/// when [`StagedDir::commit`] is called; dropped uncommitted, it is removed.
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    force: bool,
    committed: bool,
    /// Kept when dropped uncommitted if this says so (a run that can be resumed).
    keep_if: Option<fn(&Path) -> bool>,
}

impl StagedDir {
    /// Refuses an existing `target` unless `force`; the old folder is replaced only at commit.
    pub fn create(target: &Path, force: bool) -> Result<Self> {
        let staged = Self::beside(
            target,
            force,
            &format!("partial-{}", std::process::id()),
            None,
        )?;
        if staged.staging.exists() {
            std::fs::remove_dir_all(&staged.staging).runtime()?;
        }
        staged.make()
    }

    /// Like [`StagedDir::create`], but under a fixed name (`.<name>.partial`) whose contents are
    /// kept: a later run finds what an interrupted one left. Dropped uncommitted, the folder is
    /// removed unless `keep_if` says to keep it.
    pub fn reusable(target: &Path, force: bool, keep_if: fn(&Path) -> bool) -> Result<Self> {
        Self::beside(target, force, "partial", Some(keep_if))?.make()
    }

    /// The staging folder `.<name>.<suffix>` beside `target` (not yet created); an existing
    /// `target` is refused unless `force`.
    fn beside(
        target: &Path,
        force: bool,
        suffix: &str,
        keep_if: Option<fn(&Path) -> bool>,
    ) -> Result<Self> {
        if target.exists() && !force {
            bail!(
                "output folder {} already exists; choose another one or pass --force to replace it",
                target.display()
            );
        }
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        Ok(Self {
            target: target.to_path_buf(),
            staging: target.with_file_name(format!(".{name}.{suffix}")),
            force,
            committed: false,
            keep_if,
        })
    }

    /// Creates the staging folder (and the folders above it).
    fn make(self) -> Result<Self> {
        std::fs::create_dir_all(&self.staging)
            .with_context(|| format!("cannot create {}", self.staging.display()))
            .runtime()?;
        Ok(self)
    }

    /// Empties the staging folder (a fresh start over what an earlier run left).
    pub fn clear(&self) -> Result<()> {
        std::fs::remove_dir_all(&self.staging)
            .and_then(|()| std::fs::create_dir_all(&self.staging))
            .with_context(|| format!("cannot empty {}", self.staging.display()))
            .runtime()
    }

    /// Where to write the files for now.
    pub fn path(&self) -> &Path {
        &self.staging
    }

    /// The folder's final location.
    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Moves the finished folder to its final name, replacing an old one when forced.
    pub fn commit(mut self) -> Result<PathBuf> {
        if self.target.exists() {
            if !self.force {
                bail!(
                    "output folder {} appeared while writing; not replacing it",
                    self.target.display()
                );
            }
            std::fs::remove_dir_all(&self.target)
                .with_context(|| format!("cannot remove old {}", self.target.display()))
                .runtime()?;
        }
        std::fs::rename(&self.staging, &self.target)
            .with_context(|| {
                format!(
                    "cannot move {} to {}",
                    self.staging.display(),
                    self.target.display()
                )
            })
            .runtime()?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        let keep = self.keep_if.is_some_and(|keep| keep(&self.staging));
        if !self.committed && !keep {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}
