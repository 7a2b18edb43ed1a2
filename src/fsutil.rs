//! File-system helpers that never leave half-written output behind.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp-{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
}

/// An output folder that is filled under a temporary name and appears under its real name only
/// when [`StagedDir::commit`] is called; dropped uncommitted, it is removed.
pub struct StagedDir {
    target: PathBuf,
    staging: PathBuf,
    force: bool,
    committed: bool,
}

impl StagedDir {
    /// Refuses an existing `target` unless `force`; the old folder is replaced only at commit.
    pub fn create(target: &Path, force: bool) -> Result<Self> {
        if target.exists() && !force {
            bail!(
                "output folder {} already exists; choose another one or pass --force to replace it",
                target.display()
            );
        }
        let name = target.file_name().and_then(|n| n.to_str()).unwrap_or("out");
        let staging = target.with_file_name(format!(".{name}.partial-{}", std::process::id()));
        if let Some(parent) = target.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("cannot create {}", parent.display()))?;
        }
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        std::fs::create_dir_all(&staging)
            .with_context(|| format!("cannot create {}", staging.display()))?;
        Ok(Self {
            target: target.to_path_buf(),
            staging,
            force,
            committed: false,
        })
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
                .with_context(|| format!("cannot remove old {}", self.target.display()))?;
        }
        std::fs::rename(&self.staging, &self.target).with_context(|| {
            format!(
                "cannot move {} to {}",
                self.staging.display(),
                self.target.display()
            )
        })?;
        self.committed = true;
        Ok(self.target.clone())
    }
}

impl Drop for StagedDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}
