//! The publish stage: uploads an adapter or merged-model folder to the Hugging Face Hub in one
//! commit with hf-hub's API (repository created when missing; branch or pull request on request),
//! after checking that no file names a local base or path ([`check`]). Entry point: [`run`].

pub mod check;
mod progress;

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::repository::CommitOperation;
use hf_hub::{HFClientSync, RepoTypeModel};
use std::path::{Path, PathBuf};

/// What to publish where.
#[derive(Debug, Clone)]
pub struct PublishOptions {
    pub dir: PathBuf,
    pub repo: String,
    pub private: bool,
    /// Branch to commit to (created when missing); default main.
    pub revision: Option<String>,
    pub create_pr: bool,
    /// Upload even when files name a local base or path ([`check`]); private repos only.
    pub allow_local_base: bool,
    /// List what would be uploaded and stop.
    pub dry_run: bool,
}

/// The result: the files and, unless a dry run, the commit.
#[derive(Debug, Clone)]
pub struct PublishOutcome {
    pub files: Vec<(String, u64)>,
    pub commit_message: String,
    pub commit_url: Option<String>,
    pub pr_url: Option<String>,
}

/// The files of `dir` to upload, relative paths with sizes, sorted; hidden and partial files
/// skipped. A symbolic link that leads out of the folder, or to a folder, is refused.
pub fn files(dir: &Path) -> Result<Vec<(String, u64)>> {
    let root =
        std::fs::canonicalize(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in
            std::fs::read_dir(&d).with_context(|| format!("cannot read {}", d.display()))?
        {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with('.') || name.contains(".tmp-") {
                continue;
            }
            let path = entry.path();
            if entry.file_type()?.is_symlink() {
                let target = std::fs::canonicalize(&path)
                    .with_context(|| format!("{} is a broken symbolic link", path.display()))?;
                if !target.starts_with(&root) || target.is_dir() {
                    bail!(
                        "{} is a symbolic link to {}, {}; refusing to upload it (copy the file into the folder, or remove the link)",
                        path.display(),
                        target.display(),
                        if target.is_dir() { "a folder" } else { "outside the folder" }
                    );
                }
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                let rel = path.strip_prefix(dir)?.to_string_lossy().replace('\\', "/");
                out.push((rel, entry.metadata()?.len()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Files whose names look like credentials (private keys, tokens, environment files).
pub fn credential_like(files: &[(String, u64)]) -> Vec<&str> {
    files
        .iter()
        .map(|(rel, _)| rel.as_str())
        .filter(|rel| {
            let name = rel.rsplit('/').next().unwrap_or(rel).to_lowercase();
            matches!(
                name.as_str(),
                "token" | "credentials" | "credentials.json" | "id_rsa" | "id_ed25519" | "netrc"
            ) || [".pem", ".key", ".p12", ".pfx", ".env", ".token"]
                .iter()
                .any(|ext| name.ends_with(ext))
        })
        .collect()
}

/// Whether hf-hub will find a token (HF_TOKEN, HF_TOKEN_PATH, or $HF_HOME/token).
fn token_available() -> bool {
    if std::env::var("HF_TOKEN").is_ok_and(|t| !t.trim().is_empty()) {
        return true;
    }
    let path = std::env::var_os("HF_TOKEN_PATH")
        .map(PathBuf::from)
        .unwrap_or_else(|| hf_hub::hf_home().join("token"));
    std::fs::read_to_string(path).is_ok_and(|t| !t.trim().is_empty())
}

/// The commit message: what the folder is and the recipe it came from.
fn commit_message(dir: &Path) -> String {
    let kind = if dir.join("adapter_config.json").exists() {
        "LoRA adapter"
    } else {
        "merged model"
    };
    let recipe = std::fs::read_to_string(dir.join("recipe.resolved.toml"))
        .ok()
        .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
        .and_then(|t| {
            t.get("model")
                .and_then(|m| m.get("base"))
                .and_then(|b| b.as_str())
                .map(str::to_string)
        });
    match recipe {
        Some(base) => format!("Upload {kind} fine-tuned with Feinschliff from {base} (recipe in recipe.resolved.toml)"),
        None => format!("Upload {kind} exported with Feinschliff"),
    }
}

/// Checks the folder and the repo id, then uploads (or lists, for a dry run).
pub fn run(opts: &PublishOptions) -> Result<PublishOutcome> {
    let (org, name) = crate::hub::split_repo_id(&opts.repo)?;
    if opts.allow_local_base && !opts.private {
        bail!("--allow-local-base is for private repos only: add --private, or name the base by its Hub id");
    }
    let dir = &opts.dir;
    if !dir.is_dir() {
        bail!("{} is not a folder to publish", dir.display());
    }
    if !dir.join("adapter_config.json").exists() && !dir.join("config.json").exists() {
        bail!(
            "{} holds neither an adapter (adapter_config.json) nor a model (config.json)",
            dir.display()
        );
    }
    if !dir.join("README.md").exists() {
        bail!(
            "{} has no model card (README.md); `feinschliff export` writes one",
            dir.display()
        );
    }
    let files = files(dir)?;
    let secret_looking = credential_like(&files);
    if !secret_looking.is_empty() {
        tracing::warn!(
            "{} in {} look like credentials and would be uploaded to {}; remove them unless they are meant to be public",
            secret_looking.join(", "),
            dir.display(),
            opts.repo
        );
    }
    let problems = check::problems(dir, &files)?;
    if !problems.is_empty() {
        let described = check::describe(&problems);
        if !opts.allow_local_base {
            bail!("{} is not fit for the Hub:{described}\nFor a private repo, --private --allow-local-base (in a recipe: [publish] private = true, allow_local_base = true) uploads it as it is.", dir.display());
        }
        tracing::warn!(
            "uploading to private {} as it is (--allow-local-base):{described}",
            opts.repo
        );
    }
    let commit_message = commit_message(dir);
    if opts.dry_run {
        return Ok(PublishOutcome {
            files,
            commit_message,
            commit_url: None,
            pr_url: None,
        });
    }
    if !token_available() {
        bail!("no Hugging Face token: set HF_TOKEN, or store one with `huggingface-cli login` (read from HF_TOKEN_PATH or $HF_HOME/token)");
    }
    let client = HFClientSync::new()
        .map_err(|e| anyhow!("cannot set up the Hugging Face Hub client: {e}"))?;
    client
        .create_repository()
        .repo_id(&opts.repo)
        .repo_type(RepoTypeModel)
        .private(opts.private)
        .exist_ok(true)
        .send()
        .map_err(|e| anyhow!("cannot create or find repository {}: {e}", opts.repo))?;
    let repo = client.model(org, name);
    if let Some(branch) = opts.revision.as_deref().filter(|b| *b != "main") {
        if let Err(e) = repo.create_branch().branch(branch).send() {
            let msg = e.to_string();
            if !msg.contains("409") && !msg.to_lowercase().contains("already exists") {
                bail!("cannot create branch {branch} in {}: {msg}", opts.repo);
            }
        }
    }
    let operations = files
        .iter()
        .map(|(rel, _)| CommitOperation::add_file(rel.clone(), dir.join(rel)))
        .collect();
    let info = repo
        .create_commit()
        .operations(operations)
        .commit_message(commit_message.clone())
        .maybe_revision(opts.revision.clone())
        .create_pr(opts.create_pr)
        .progress(progress::UploadProgress::new(&opts.repo))
        .send()
        .map_err(|e| anyhow!("upload to {} failed: {e}", opts.repo))?;
    Ok(PublishOutcome {
        files,
        commit_message,
        commit_url: info.commit_url,
        pr_url: info.pr_url,
    })
}
