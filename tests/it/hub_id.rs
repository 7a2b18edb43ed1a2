//! What goes to the Hub names the base by its Hub id, never by a local path: a cache-style base,
//! a local base with `[model] hub_id`, and a local base without an id (refused by `publish`).

use base64::Engine as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use super::common::tiny_llama_dir;
use super::hub_server::HubServer;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn feinschliff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_feinschliff"))
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// The tiny llama copied into an hf-hub cache layout under `root`: models--acme--tiny-llama.
fn cache_base(root: &Path) -> PathBuf {
    let snapshot = root
        .join("hub/models--acme--tiny-llama/snapshots")
        .join(COMMIT);
    std::fs::create_dir_all(&snapshot).unwrap();
    for entry in std::fs::read_dir(tiny_llama_dir()).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, snapshot.join(path.file_name().unwrap())).unwrap();
    }
    snapshot
}

/// Data, an eval suite and a recipe on `base` in `dir`; `extra` goes into `[model]`, `sections`
/// after the recipe.
fn write_recipe(dir: &Path, base: &Path, extra: &str, sections: &str) -> PathBuf {
    let mut rows = String::new();
    for i in 0..16 {
        rows.push_str(&serde_json::json!({"prompt": format!("Frage {i}: Wann ist offen?\nAntwort:"), "completion": format!(" Montag bis Freitag, {i}.")}).to_string());
        rows.push('\n');
    }
    std::fs::write(dir.join("train.jsonl"), rows).unwrap();
    std::fs::write(
        dir.join("ppl.jsonl"),
        "{\"text\": \"Das Kundenzentrum ist Montag bis Freitag offen.\"}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("suite.toml"),
        "name = \"domain\"\n[[task]]\nname = \"ppl\"\nkind = \"perplexity\"\ndataset = { path = \"ppl.jsonl\" }\nlicense = \"CC0-1.0\"\ncontext = \"{{ text }}\"\n",
    )
    .unwrap();
    let recipe = format!(
        "[model]\nbase = \"{}\"\n{extra}\n[data]\nformat = \"completion\"\nmax_seq_len = 32\nvalidation_fraction = 0.0\n\n[[data.train]]\npath = \"train.jsonl\"\n\n[train]\nmax_steps = 2\ndevice = \"cpu\"\n\n[output]\ndir = \"out\"\n{sections}",
        base.display()
    );
    let path = dir.join("recipe.toml");
    std::fs::write(&path, recipe).unwrap();
    path
}

fn train(recipe: &Path, hub: Option<&HubServer>) -> Output {
    let mut c = feinschliff();
    c.arg("train")
        .arg(recipe)
        .env("HF_HOME", recipe.parent().unwrap().join("hf-home"));
    if let Some(server) = hub {
        c.env("HF_ENDPOINT", &server.url)
            .env("HF_TOKEN", "hf_test_token");
    }
    c.output().unwrap()
}

fn publish(dir: &Path, args: &[&str], hub: &HubServer) -> Output {
    feinschliff()
        .arg("publish")
        .arg(dir)
        .args(["--repo", "acme/x"])
        .args(args)
        .env("HF_ENDPOINT", &hub.url)
        .env("HF_TOKEN", "hf_test_token")
        .env("HF_HOME", dir.join("../hf-home"))
        .output()
        .unwrap()
}

/// The commit message and the files (path, content) of the server's one commit.
fn uploaded(hub: &HubServer) -> (String, Vec<(String, Vec<u8>)>) {
    let requests = hub.recorded();
    let commit = requests
        .iter()
        .find(|r| r.path.contains("/commit/"))
        .expect("no commit request");
    let lines: Vec<serde_json::Value> = String::from_utf8(commit.body.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let files = lines[1..]
        .iter()
        .map(|l| {
            let content = base64::engine::general_purpose::STANDARD
                .decode(l["value"]["content"].as_str().unwrap())
                .unwrap();
            (l["value"]["path"].as_str().unwrap().to_string(), content)
        })
        .collect();
    (
        lines[0]["value"]["summary"].as_str().unwrap().to_string(),
        files,
    )
}

/// Fails when any file holds the test's folder or the tiny model's folder.
fn assert_no_local_path(files: &[(String, Vec<u8>)], test_dir: &Path) {
    let needles = [
        test_dir.display().to_string(),
        tiny_llama_dir().display().to_string(),
    ];
    for (name, bytes) in files {
        let text = String::from_utf8_lossy(bytes);
        for n in &needles {
            assert!(!text.contains(n.as_str()), "{name} contains {n}:\n{text}");
        }
    }
}

/// The files of a folder as `publish` would upload them.
fn folder_files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    feinschliff::publish::files(dir)
        .unwrap()
        .into_iter()
        .map(|(rel, _)| {
            let bytes = std::fs::read(dir.join(&rel)).unwrap();
            (rel, bytes)
        })
        .collect()
}

fn json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn resolved_model(out: &Path) -> toml::Table {
    let t: toml::Table =
        toml::from_str(&std::fs::read_to_string(out.join("recipe.resolved.toml")).unwrap())
            .unwrap();
    t["model"].as_table().unwrap().clone()
}

#[test]
fn a_cache_style_base_is_named_org_name_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let base = cache_base(d);
    let recipe = write_recipe(
        d,
        &base,
        "",
        "\n[eval]\nsuites = [\"suite.toml\"]\n\n[export]\nout = \"merged\"\n\n[publish]\nrepo = \"acme/x\"\n",
    );
    let hub = HubServer::start();
    let o = train(&recipe, Some(&hub));
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.join("out");
    let config = json(&out.join("adapter_config.json"));
    assert_eq!(config["base_model_name_or_path"], "acme/tiny-llama");
    assert_eq!(config["revision"], COMMIT);
    let model = resolved_model(&out);
    assert_eq!(model["base"].as_str(), Some("acme/tiny-llama"));
    assert_eq!(model["revision"].as_str(), Some(COMMIT));
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    for want in [
        "base_model: \"acme/tiny-llama\"",
        "- base_model:adapter:acme/tiny-llama\n",
        "# LoRA adapter for acme/tiny-llama\n",
        "from_pretrained(\"acme/tiny-llama\")",
    ] {
        assert!(card.contains(want), "card lacks `{want}`:\n{card}");
    }
    let results = json(&out.join("eval/domain/results.json"));
    assert_eq!(results["model_name"], "acme/tiny-llama");
    // The recipe published the merged model.
    let merged_card = std::fs::read_to_string(d.join("merged/README.md")).unwrap();
    assert!(
        merged_card.contains("base_model: \"acme/tiny-llama\"")
            && merged_card.contains("- base_model:merge:acme/tiny-llama\n"),
        "{merged_card}"
    );
    let (_, files) = uploaded(&hub);
    assert!(files.iter().any(|(f, _)| f == "config.json"));
    assert_no_local_path(&files, d);
    // The adapter folder, published by hand.
    let hub = HubServer::start();
    let o = publish(&out, &[], &hub);
    assert!(o.status.success(), "{}", stderr(&o));
    let (message, files) = uploaded(&hub);
    assert!(message.contains("from acme/tiny-llama"), "{message}");
    assert!(files.iter().any(|(f, _)| f == "eval/domain/results.json"));
    assert_no_local_path(&files, d);
}

#[test]
fn a_local_base_with_hub_id_is_named_by_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = write_recipe(d, tiny_llama_dir(), "hub_id = \"acme/tiny-llama\"\n", "");
    let o = train(&recipe, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.join("out");
    assert_eq!(
        json(&out.join("adapter_config.json"))["base_model_name_or_path"],
        "acme/tiny-llama"
    );
    let model = resolved_model(&out);
    assert_eq!(model["base"].as_str(), Some("acme/tiny-llama"));
    assert!(model.get("hub_id").is_none(), "{model:?}");
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("base_model: \"acme/tiny-llama\""), "{card}");
    let hub = HubServer::start();
    let o = publish(&out, &["--dry-run"], &hub);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("from acme/tiny-llama"));
    assert_no_local_path(&folder_files(&out), d);
    // An exported copy on the folder (another name: --any-base) keeps the adapter's id.
    let o = feinschliff()
        .args(["export", "--any-base", "--adapter"])
        .arg(&out)
        .arg("--base")
        .arg(tiny_llama_dir())
        .arg("--out")
        .arg(d.join("exported"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let exported = d.join("exported");
    assert_eq!(
        json(&exported.join("adapter_config.json"))["base_model_name_or_path"],
        "acme/tiny-llama"
    );
    assert_eq!(
        resolved_model(&exported)["base"].as_str(),
        Some("acme/tiny-llama")
    );
    assert_no_local_path(&folder_files(&exported), d);
}

#[test]
fn a_local_base_without_an_id_is_refused_by_publish() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let recipe = write_recipe(d, tiny_llama_dir(), "", "");
    let o = train(&recipe, None);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = d.join("out");
    let folder = tiny_llama_dir().file_name().unwrap().to_str().unwrap();
    assert_eq!(
        json(&out.join("adapter_config.json"))["base_model_name_or_path"],
        folder
    );
    assert_eq!(resolved_model(&out)["base"].as_str(), Some(folder));
    assert_no_local_path(&folder_files(&out), d);
    let hub = HubServer::start();
    for args in [&[][..], &["--dry-run"]] {
        let o = publish(&out, args, &hub);
        let err = stderr(&o);
        assert!(!o.status.success(), "{args:?}");
        for want in [
            "adapter_config.json names the base model",
            "README.md names the base model",
            "recipe.resolved.toml names the base model",
            "hub_id = \"org/name\"",
            "--allow-local-base",
        ] {
            assert!(err.contains(want), "{args:?}: lacks `{want}`: {err}");
        }
    }
    let o = publish(&out, &["--allow-local-base", "--dry-run"], &hub);
    assert!(
        !o.status.success() && stderr(&o).contains("private repos only"),
        "{}",
        stderr(&o)
    );
    let o = publish(
        &out,
        &["--private", "--allow-local-base", "--dry-run"],
        &hub,
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(hub.recorded().is_empty(), "a refused publish made requests");
    // A path of this machine in any file is refused by name.
    std::fs::write(
        out.join("notes.md"),
        format!("trained in {}\n", d.display()),
    )
    .unwrap();
    let o = publish(&out, &["--dry-run"], &hub);
    let err = stderr(&o);
    assert!(
        err.contains(&format!("notes.md contains `{}`", d.display())),
        "{err}"
    );
    // A recipe that would publish under a folder name stops before training.
    let recipe = write_recipe(d, tiny_llama_dir(), "", "\n[publish]\nrepo = \"acme/x\"\n");
    std::fs::remove_dir_all(&out).unwrap();
    let o = train(&recipe, Some(&hub));
    let err = stderr(&o);
    assert!(
        !o.status.success() && err.contains("[model] hub_id") && !out.exists(),
        "{err}"
    );
}
