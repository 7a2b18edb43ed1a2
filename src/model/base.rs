//! The base model, located once: the local folder its weights are read from, and the Hub id (with
//! revision) that every file written for the Hub names it by. The id comes from the base itself
//! (`org/name`), from the hf-hub cache layout (`models--org--name/snapshots/<rev>`), from the
//! recipe (`[model] hub_id`), or from `_name_or_path` in config.json; without one, files name the
//! folder only, never its path.

use anyhow::{bail, Result};
use std::path::{Component, Path, PathBuf};

/// A located base model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseModel {
    /// Where the checkpoint is read from (a folder, or a GGUF file); a path of this machine, never
    /// written into output.
    pub dir: PathBuf,
    /// The Hub repo id (`org/name`), when known.
    pub hub_id: Option<String>,
    /// The Hub revision of these files (a commit for cache snapshots), when known.
    pub revision: Option<String>,
}

impl BaseModel {
    /// What output files call the base: its Hub id, else the folder's name.
    pub fn name(&self) -> String {
        if let Some(id) = &self.hub_id {
            return id.clone();
        }
        let dir = std::fs::canonicalize(&self.dir).unwrap_or_else(|_| self.dir.clone());
        dir.file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "base-model".into())
    }
}

/// Locates `base`: a folder or GGUF file (already resolved to `path`), or a Hub repo id fetched through the
/// cache; `hub_id` names the Hub id of a local folder (the recipe's `[model] hub_id`). The id is the
/// first of: `base` itself, the cache layout, `hub_id`, `_name_or_path`; the revision is the cache
/// snapshot's, else `revision`.
pub fn locate(
    base: &str,
    path: &Path,
    revision: Option<&str>,
    hub_id: Option<&str>,
) -> Result<BaseModel> {
    let (dir, own_id) = if path.is_dir() || super::gguf::is_gguf(path) {
        (path.to_path_buf(), None)
    } else if crate::hub::looks_like_repo_id(base, path) {
        (crate::hub::model_snapshot(base, revision)?, Some(base))
    } else if path.is_file() {
        bail!(
            "{} is a file, but not a GGUF file (a model is a checkpoint folder, a .gguf file or a Hub repo id)",
            path.display()
        )
    } else {
        bail!(
            "model folder {} does not exist (and `{base}` is not a Hub repo id of the form org/name)",
            path.display()
        )
    };
    let cached = cache_snapshot(&dir);
    let revision = match &cached {
        Some((_, rev)) => Some(rev.clone()),
        None => revision.map(str::to_string),
    };
    let hub_id = own_id
        .map(str::to_string)
        .or(cached.map(|(id, _)| id))
        .or(hub_id.map(str::to_string))
        .or_else(|| name_or_path(&dir));
    Ok(BaseModel {
        dir,
        hub_id,
        revision,
    })
}

/// `org/name` and the revision of a folder `…/models--org--name/snapshots/<rev>` in the hf-hub cache.
fn cache_snapshot(dir: &Path) -> Option<(String, String)> {
    let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    let names: Vec<&str> = dir
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => n.to_str(),
            _ => None,
        })
        .collect();
    let [.., repo, "snapshots", rev] = names.as_slice() else {
        return None;
    };
    let (org, name) = repo.strip_prefix("models--")?.split_once("--")?;
    let id = format!("{org}/{name}");
    crate::hub::is_repo_id(&id).then(|| (id, rev.to_string()))
}

/// `_name_or_path` of the folder's config.json, when it is a Hub repo id.
fn name_or_path(dir: &Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    let name = config.get("_name_or_path")?.as_str()?;
    crate::hub::is_repo_id(name).then(|| name.to_string())
}
