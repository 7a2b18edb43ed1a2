//! What may go to the Hub: every file names the base model by a Hub id (`org/name`) and holds no
//! absolute path of this machine. [`problems`] finds each offence and its file, [`describe`] says
//! how to fix them.

use anyhow::{Context, Result};
use std::collections::BTreeSet;
use std::path::Path;

/// One offence: the file, and what in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Problem {
    /// The file names the base model by something that is not a Hub id.
    LocalBase { file: String, base: String },
    /// The file holds an absolute path of this machine.
    LocalPath { file: String, path: String },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::LocalBase { file, base } => write!(
                f,
                "{file} names the base model `{base}`, which is not a Hub id (org/name)"
            ),
            Problem::LocalPath { file, path } => {
                write!(f, "{file} contains `{path}`, a path of this machine")
            }
        }
    }
}

/// The offences in `files` (paths relative to `dir`); weights are not read.
pub fn problems(dir: &Path, files: &[(String, u64)]) -> Result<Vec<Problem>> {
    let mut out = Vec::new();
    for (rel, _) in files.iter().filter(|(f, _)| !f.ends_with(".safetensors")) {
        let path = dir.join(rel);
        let bytes =
            std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let base = named_base(rel, &text).filter(|b| !crate::hub::is_repo_id(b));
        for local in local_paths(&text)
            .into_iter()
            .filter(|p| Some(p) != base.as_ref())
        {
            out.push(Problem::LocalPath {
                file: rel.clone(),
                path: local,
            });
        }
        if let Some(base) = base {
            out.push(Problem::LocalBase {
                file: rel.clone(),
                base,
            });
        }
    }
    Ok(out)
}

/// The problems, one a line, followed by how to fix each kind.
pub fn describe(problems: &[Problem]) -> String {
    let mut s: String = problems.iter().map(|p| format!("\n  - {p}")).collect();
    if problems
        .iter()
        .any(|p| matches!(p, Problem::LocalBase { .. }))
    {
        s.push_str("\nName the base by its Hub id: set [model] hub_id = \"org/name\" in the recipe and train again, or export the adapter again with `feinschliff export --adapter DIR --base org/name --out NEW_DIR`.");
    }
    if problems
        .iter()
        .any(|p| matches!(p, Problem::LocalPath { .. }))
    {
        s.push_str("\nWrite the recipe's paths relative to its folder and train again, or remove the paths from those files.");
    }
    s
}

/// The base model a file Feinschliff writes names: adapter_config.json's base_model_name_or_path,
/// the model card's `base_model`, recipe.resolved.toml's `[model] base`.
fn named_base(rel: &str, text: &str) -> Option<String> {
    match rel {
        "adapter_config.json" => serde_json::from_str::<serde_json::Value>(text)
            .ok()?
            .get("base_model_name_or_path")?
            .as_str()
            .map(str::to_string),
        "README.md" => {
            let front = text.strip_prefix("---\n")?.split("\n---").next()?;
            let value = front.lines().find_map(|l| l.strip_prefix("base_model:"))?;
            let value = value.trim();
            // A YAML list of bases (on the following lines) is left to the Hub to judge.
            (!value.is_empty()).then(|| {
                serde_json::from_str::<String>(value).unwrap_or_else(|_| value.to_string())
            })
        }
        "recipe.resolved.toml" => toml::from_str::<toml::Table>(text)
            .ok()?
            .get("model")?
            .get("base")?
            .as_str()
            .map(str::to_string),
        _ => None,
    }
}

/// Absolute paths in `text` that lead into a folder of this machine (their first two
/// components exist here): `/home/me/models/llama`, `/tmp/run/out`; URLs are not paths.
fn local_paths(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut found = BTreeSet::new();
    for (i, _) in text.match_indices('/') {
        let starts = i == 0 || b" \t\r\n\"'`([=:,".contains(&bytes[i - 1]);
        if !starts || bytes.get(i + 1) == Some(&b'/') {
            continue;
        }
        let rest = &text[i..];
        let end = rest
            .find(|c: char| c.is_whitespace() || "\"'`()[]{}<>,;|\\".contains(c))
            .unwrap_or(rest.len());
        let path = rest[..end].trim_end_matches(['.', ':']);
        let top: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).take(2).collect();
        if top.len() == 2 && Path::new(&format!("/{}/{}", top[0], top[1])).exists() {
            found.insert(path.to_string());
        }
    }
    found
}
