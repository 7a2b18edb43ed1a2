//! The Hugging Face Hub through `hf-hub`: model snapshots and dataset files, resolved from the
//! Python-compatible cache (HF_HOME / HF_HUB_CACHE), a local mirror folder, or the network.
//! `HF_HUB_OFFLINE=1` keeps every lookup in the cache and mirror.

use anyhow::{anyhow, bail, Result};
use hf_hub::HFClientSync;
use std::path::{Path, PathBuf};

/// Files of a checkpoint that Feinschliff reads; only these are fetched.
pub const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Whether HF_HUB_OFFLINE asks for no network access (as huggingface_hub reads it).
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .map(|v| {
            matches!(
                v.trim().to_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        })
        .unwrap_or(false)
}

/// `org/name` → (org, name), refusing anything that is not a valid repo id.
pub fn split_repo_id(id: &str) -> Result<(&str, &str)> {
    let valid = |s: &str| {
        !s.is_empty()
            && s.len() <= 96
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            && !s.starts_with(['-', '.'])
            && !s.contains("..")
    };
    match id.split_once('/') {
        Some((org, name)) if valid(org) && valid(name) => Ok((org, name)),
        _ => bail!("`{id}` is not a Hub repo id; expected `org/name` (letters, digits, - _ .)"),
    }
}

/// Whether `name` is a Hub repo id (`org/name`), not a path.
pub fn is_repo_id(name: &str) -> bool {
    split_repo_id(name).is_ok()
}

/// Whether a `[model] base` names a Hub repo rather than a folder.
pub fn looks_like_repo_id(base: &str, resolved: &Path) -> bool {
    !resolved.exists() && is_repo_id(base)
}

fn client() -> Result<HFClientSync> {
    HFClientSync::new().map_err(|e| anyhow!("cannot set up the Hugging Face Hub client: {e}"))
}

/// The local folder of a Hub model at `revision`, downloading what is missing unless offline.
pub fn model_snapshot(repo_id: &str, revision: Option<&str>) -> Result<PathBuf> {
    let (org, name) = split_repo_id(repo_id)?;
    let offline = offline();
    let dir = client()?
        .model(org, name)
        .snapshot_download()
        .maybe_revision(revision.map(str::to_string))
        .allow_patterns(MODEL_FILES.iter().map(|s| s.to_string()).collect())
        .local_files_only(offline)
        .send()
        .map_err(|e| missing_model(repo_id, revision, offline, &e.to_string()))?;
    let has_weights =
        dir.join("model.safetensors").exists() || dir.join("model.safetensors.index.json").exists();
    let missing: Vec<&str> = ["config.json", "tokenizer.json"]
        .into_iter()
        .filter(|f| !dir.join(f).exists())
        .chain((!has_weights).then_some("model.safetensors"))
        .collect();
    if !missing.is_empty() {
        return Err(missing_model(
            repo_id,
            revision,
            offline,
            &format!("the snapshot lacks {}", missing.join(", ")),
        ));
    }
    Ok(dir)
}

fn missing_model(repo_id: &str, revision: Option<&str>, offline: bool, why: &str) -> anyhow::Error {
    let rev = revision.unwrap_or("main");
    if offline {
        anyhow!(
            "model {repo_id}@{rev} is not in the Hugging Face cache ({}) and HF_HUB_OFFLINE is set ({why}); \
             it needs config.json, tokenizer.json, tokenizer_config.json and the safetensors weights. \
             Download them on a connected machine (`huggingface-cli download {repo_id}`) and copy the cache, \
             or point [model] base at a local folder",
            cache_dir().display()
        )
    } else {
        anyhow!("cannot fetch model {repo_id}@{rev} from the Hugging Face Hub: {why}")
    }
}

/// The hub cache folder hf-hub uses (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub).
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return PathBuf::from(p);
    }
    let home = std::env::var_os("HF_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                .unwrap_or_default()
                .join("huggingface")
        });
    home.join("hub")
}

/// The local folder of a Hub dataset's files for `config`/`split` (the Hub's parquet conversion,
/// `refs/convert/parquet`, unless another revision is named), from the cache or the network.
pub fn dataset_snapshot(
    repo_id: &str,
    config: &str,
    split: &str,
    revision: Option<&str>,
) -> Result<PathBuf> {
    let (org, name) = split_repo_id(repo_id)?;
    let revision = revision.unwrap_or("refs/convert/parquet");
    let offline = offline();
    client()?
        .dataset(org, name)
        .snapshot_download()
        .revision(revision.to_string())
        .allow_patterns(vec![format!("{config}/{split}/*"), format!("{config}/{split}-*"), format!("{config}/{split}.*")])
        .local_files_only(offline)
        .send()
        .map_err(|e| {
            anyhow!(
                "cannot get dataset {repo_id} (config `{config}`, split `{split}`, revision {revision}){}: {e}; \
                 for air-gapped machines put its files in a mirror folder ([data] mirror or FEINSCHLIFF_MIRROR) as <mirror>/{org}/{name}/{config}/{split}/*.parquet",
                if offline { " from the cache (HF_HUB_OFFLINE is set)" } else { "" }
            )
        })
}
