//! Publishing to the Hub (against the loopback server) and models from the hub cache.

use base64::Engine as _;
use std::process::Command;

use super::common::tiny_llama_dir;
use super::hub_server::HubServer;

fn feinschliff() -> Command {
    Command::new(env!("CARGO_BIN_EXE_feinschliff"))
}

/// An adapter folder with a card, made from the PEFT fixture.
fn adapter_folder(dir: &std::path::Path) -> std::path::PathBuf {
    let fixture = super::common::repo().join("tests/fixtures/parity/llama3");
    let out = dir.join("adapter");
    let o = feinschliff()
        .args(["export", "--adapter"])
        .arg(fixture.join("adapter"))
        .arg("--base")
        .arg(&fixture)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

#[test]
fn publish_uploads_every_file_in_one_commit() {
    let dir = tempfile::tempdir().unwrap();
    let folder = adapter_folder(dir.path());
    let server = HubServer::start();
    let o = feinschliff()
        .arg("publish")
        .arg(&folder)
        .args([
            "--repo",
            "acme/adapter",
            "--private",
            "--revision",
            "experiments",
            "--create-pr",
        ])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_TOKEN", "hf_test_token")
        .env("HF_HOME", dir.path().join("hf-home"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("uploaded 3 files to acme/adapter"));
    let requests = server.recorded();
    let paths: Vec<String> = requests
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(paths[0], "POST /api/repos/create", "{paths:?}");
    let create: serde_json::Value = serde_json::from_slice(&requests[0].body).unwrap();
    assert_eq!(create["name"], "adapter");
    assert_eq!(create["organization"], "acme");
    assert_eq!(create["private"], true);
    assert!(
        paths
            .iter()
            .any(|p| p == "POST /api/models/acme/adapter/branch/experiments"),
        "{paths:?}"
    );
    let commit = requests
        .iter()
        .find(|r| r.path.contains("/commit/"))
        .expect("no commit request");
    assert_eq!(commit.path, "/api/models/acme/adapter/commit/experiments");
    assert!(commit.target.contains("create_pr=1"), "{}", commit.target);
    assert!(requests
        .iter()
        .all(|r| r.authorization.as_deref() == Some("Bearer hf_test_token")));
    // NDJSON: a header with the message, then one line per file with its base64 content.
    let lines: Vec<serde_json::Value> = String::from_utf8(commit.body.clone())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines[0]["key"], "header");
    assert!(
        lines[0]["value"]["summary"]
            .as_str()
            .unwrap()
            .contains("LoRA adapter"),
        "{}",
        lines[0]
    );
    let mut uploaded: Vec<String> = lines[1..]
        .iter()
        .map(|l| l["value"]["path"].as_str().unwrap().to_string())
        .collect();
    uploaded.sort();
    assert_eq!(
        uploaded,
        vec![
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors"
        ]
    );
    let weights = lines
        .iter()
        .find(|l| l["value"]["path"] == "adapter_model.safetensors")
        .unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(weights["value"]["content"].as_str().unwrap())
        .unwrap();
    assert_eq!(
        bytes,
        std::fs::read(folder.join("adapter_model.safetensors")).unwrap()
    );
}

#[test]
fn publish_refuses_bad_input_before_any_request() {
    let dir = tempfile::tempdir().unwrap();
    let folder = adapter_folder(dir.path());
    let run = |args: &[&str], token: Option<&str>| {
        let mut c = feinschliff();
        c.arg("publish")
            .arg(&folder)
            .args(args)
            .env("HF_HOME", dir.path().join("hf-home"))
            .env("HF_ENDPOINT", "http://127.0.0.1:9");
        c.env_remove("HF_TOKEN").env_remove("HF_TOKEN_PATH");
        if let Some(t) = token {
            c.env("HF_TOKEN", t);
        }
        c.output().unwrap()
    };
    let o = run(&["--repo", "not a repo"], Some("t"));
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("not a Hub repo id")
    );
    let o = run(&["--repo", "acme/adapter"], None);
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("no Hugging Face token"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = run(&["--repo", "acme/adapter", "--dry-run"], None);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("adapter_model.safetensors") && out.contains("dry run: 3 files"),
        "{out}"
    );
}

#[test]
fn hub_models_resolve_from_the_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let repo = cache.join("models--acme--tiny");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    let snapshot = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny_llama_dir().join(f), snapshot.join(f)).unwrap();
    }
    let o = feinschliff()
        .args(["model", "inspect", "acme/tiny"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("family       llama"));
    let o = feinschliff()
        .args(["model", "inspect", "acme/missing"])
        .env("HF_HUB_CACHE", &cache)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("acme/missing")
            && err.contains("HF_HUB_OFFLINE")
            && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn hub_datasets_resolve_from_the_cache_offline() {
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("hub");
    let repo = cache.join("datasets--acme--support");
    let commit = "89abcdef0123456789abcdef0123456789abcdef";
    // The Hub's parquet conversion lives under the ref refs/convert/parquet.
    std::fs::create_dir_all(repo.join("refs/refs/convert")).unwrap();
    std::fs::write(repo.join("refs/refs/convert/parquet"), commit).unwrap();
    let split = repo.join("snapshots").join(commit).join("default/train");
    std::fs::create_dir_all(&split).unwrap();
    std::fs::write(
        split.join("0000.jsonl"),
        "{\"text\": \"Aus dem Cache.\"}\n{\"text\": \"Zweite Zeile.\"}\n",
    )
    .unwrap();
    let recipe = format!(
        "[model]\nbase = \"{}\"\n[data]\nformat = \"text\"\nvalidation_fraction = 0.0\n[[data.train]]\nhub = \"acme/support\"\nsplit = \"train\"\n[output]\ndir = \"out\"\n",
        tiny_llama_dir().display()
    );
    std::fs::write(dir.path().join("r.toml"), recipe).unwrap();
    let inspect = |repo_id: &str| {
        std::fs::write(
            dir.path().join("r.toml"),
            std::fs::read_to_string(dir.path().join("r.toml"))
                .unwrap()
                .replace("acme/support", repo_id),
        )
        .unwrap();
        feinschliff()
            .args(["data", "inspect"])
            .arg(dir.path().join("r.toml"))
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("FEINSCHLIFF_MIRROR")
            .output()
            .unwrap()
    };
    let o = inspect("acme/support");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("2 rows read"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let o = inspect("acme/missing");
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("acme/missing") && err.contains("HF_HUB_OFFLINE") && err.contains("mirror"),
        "{err}"
    );
}

/// The token stays out of what Feinschliff prints, even when the Hub's error repeats it.
#[test]
fn the_hub_token_never_appears_in_messages() {
    let dir = tempfile::tempdir().unwrap();
    let folder = adapter_folder(dir.path());
    let server = HubServer::start();
    let token = "hf_FAKEtokenForTheRedactionTest0123";
    let o = feinschliff()
        .arg("publish")
        .arg(&folder)
        .args(["--repo", "acme/echo-auth", "--private"])
        .env("HF_ENDPOINT", &server.url)
        .env("HF_TOKEN", token)
        .env("HF_HOME", dir.path().join("hf-home"))
        .env("RUST_LOG", "debug")
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(!o.status.success());
    let sent = server.recorded();
    assert!(
        sent.iter()
            .any(|r| r.authorization.as_deref() == Some(&format!("Bearer {token}"))),
        "the token was sent"
    );
    assert!(!out.contains(token) && !err.contains(token), "{err}");
    assert!(err.contains(feinschliff::secrets::REDACTED), "{err}");
}

/// Symbolic links out of the folder are refused; files that look like credentials are named.
#[test]
fn publish_refuses_outside_links_and_warns_about_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let folder = adapter_folder(dir.path());
    let publish = |folder: &std::path::Path| {
        feinschliff()
            .arg("publish")
            .arg(folder)
            .args(["--repo", "acme/adapter", "--dry-run"])
            .output()
            .unwrap()
    };
    std::fs::write(folder.join("server.pem"), "-----BEGIN PRIVATE KEY-----").unwrap();
    let o = publish(&folder);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("server.pem") && err.contains("look like credentials"),
        "{err}"
    );

    let outside = dir.path().join("secret.txt");
    std::fs::write(&outside, "not for the Hub").unwrap();
    std::os::unix::fs::symlink(&outside, folder.join("notes.txt")).unwrap();
    let o = publish(&folder);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("notes.txt") && err.contains("outside the folder"),
        "{err}"
    );
}
