//! Runs that survive faults: a training process killed (SIGKILL) at random moments and resumed
//! ends with the adapter of an uninterrupted run, byte for byte; SIGINT checkpoints and exits with
//! 130; a changed recipe refuses to resume; non-finite losses stop or skip; exit codes say what
//! failed; a full disk leaves nothing half-written.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::common::{repo, tiny_llama_dir};

fn feinschliff(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_feinschliff"));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    c
}

/// A recipe over the shipped support FAQ on the tiny Llama, checkpointing every step.
fn write_recipe(dir: &Path, steps: usize, extra: &str) -> PathBuf {
    let path = dir.join("recipe.toml");
    let text = format!(
        r#"[model]
base = "{base}"

[lora]
r = 4
alpha = 8
dropout = 0.1

[data]
format = "instruction"
max_seq_len = 128
validation_fraction = 0.1

[[data.train]]
path = "{data}"

[train]
max_steps = {steps}
batch_size = 4
lr = 1e-3
warmup_steps = 2
eval_every = 5
save_every = 1
seed = 7
{extra}
[output]
dir = "run"
"#,
        base = tiny_llama_dir().display(),
        data = repo().join("datasets/support-faq/faq.parquet").display(),
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn train(recipe: &Path, args: &[&str]) -> Output {
    let mut all = vec!["train", recipe.to_str().unwrap()];
    all.extend_from_slice(args);
    feinschliff(&all).output().unwrap()
}

fn wait_or_kill(mut child: Child, after: Duration) -> Option<Output> {
    let start = Instant::now();
    while start.elapsed() < after {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    None
}

fn losses(metrics: &Path) -> Vec<(u64, f64, f64)> {
    std::fs::read_to_string(metrics)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            let f = |k: &str| v[k].as_f64().unwrap();
            (v["step"].as_u64().unwrap(), f("loss"), f("grad_norm"))
        })
        .collect()
}

#[test]
fn killed_runs_resume_to_the_uninterrupted_adapter() {
    // Long enough that five kills (at most 0.7 s each) never reach the end of the run.
    let steps = 200;
    let reference = tempfile::tempdir().unwrap();
    let recipe = write_recipe(reference.path(), steps, "");
    let o = train(&recipe, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want = std::fs::read(reference.path().join("run/adapter_model.safetensors")).unwrap();
    let want_losses = losses(&reference.path().join("run/metrics.jsonl"));

    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), steps, "");
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut kills = 0;
    let mut resume = false;
    let finished = loop {
        let args: &[&str] = if resume { &["--resume"] } else { &[] };
        let mut all = vec!["train", recipe.to_str().unwrap()];
        all.extend_from_slice(args);
        let child = feinschliff(&all).spawn().unwrap();
        // Kill at a random moment (while loading, between steps, inside a checkpoint write),
        // five times, then let the run finish.
        let after = if kills < 5 {
            Duration::from_millis(rng.random_range(100..700))
        } else {
            Duration::from_secs(120)
        };
        match wait_or_kill(child, after) {
            Some(out) => break out,
            None => {
                kills += 1;
                // A kill before the first checkpoint leaves nothing to resume: start afresh.
                let partial = dir.path().join(".run.partial/checkpoints");
                resume = std::fs::read_dir(&partial)
                    .map(|d| d.flatten().any(|e| is_complete_checkpoint(&e.path())))
                    .unwrap_or(false);
            }
        }
    };
    assert!(finished.status.success(), "{}", stderr(&finished));
    assert_eq!(kills, 5);
    let got = std::fs::read(dir.path().join("run/adapter_model.safetensors")).unwrap();
    assert!(
        got == want,
        "the resumed adapter differs from the uninterrupted one"
    );
    let got_losses = losses(&dir.path().join("run/metrics.jsonl"));
    let steps_logged: Vec<u64> = got_losses.iter().map(|l| l.0).collect();
    assert_eq!(steps_logged, (1..=steps as u64).collect::<Vec<_>>());
    assert_eq!(got_losses, want_losses, "loss and grad norm per step");
    assert!(!dir.path().join("run/checkpoints").exists());
    assert!(!dir.path().join(".run.partial").exists());
}

#[test]
fn sigint_checkpoints_and_exits_130_then_resume_refuses_changes() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 400, "");
    let child = feinschliff(&["train", recipe.to_str().unwrap()])
        .spawn()
        .unwrap();
    let metrics = dir.path().join(".run.partial/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3 {
        assert!(start.elapsed() < Duration::from_secs(60), "no steps logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(
        err.contains("interrupted by SIGINT") && err.contains("--resume"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists(), "no half-finished output");

    let again = train(&recipe, &[]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("pass --resume"),
        "{}",
        stderr(&again)
    );

    let changed = train(&recipe, &["--resume", "--set", "train.lr=0.5"]);
    let err = stderr(&changed);
    assert_eq!(changed.status.code(), Some(2), "{err}");
    assert!(
        err.contains("recipe `train.lr` was 0.001 and is now 0.5"),
        "{err}"
    );
    let saving_differently = train(
        &recipe,
        &[
            "--resume",
            "--set",
            "train.max_steps=6",
            "--set",
            "train.save_every=2",
        ],
    );
    let err = stderr(&saving_differently);
    assert!(
        err.contains("train.max_steps") && !err.contains("save_every"),
        "only the step count is named: {err}"
    );
}

/// Starts a long run and waits until it has logged `steps` steps.
fn started_run(dir: &Path, steps: usize) -> Child {
    let recipe = write_recipe(dir, 400, "");
    let child = feinschliff(&["train", recipe.to_str().unwrap()])
        .spawn()
        .unwrap();
    let metrics = dir.join(".run.partial/metrics.jsonl");
    let start = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < steps {
        assert!(start.elapsed() < Duration::from_secs(60), "no steps logged");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

fn signal(child: &Child, name: &str) {
    let sent = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// A `checkpoint-<step>` folder with its state file (not a temporary one cut short).
fn is_complete_checkpoint(path: &Path) -> bool {
    let name = path.file_name().unwrap().to_string_lossy().into_owned();
    name.starts_with("checkpoint-") && path.join("state.json").exists()
}

fn complete_checkpoints(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join(".run.partial/checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| is_complete_checkpoint(p))
        .collect()
}

/// SIGTERM checkpoints and exits with 143; only `save_total_limit` (2) checkpoints are kept.
#[test]
fn sigterm_checkpoints_and_exits_143() {
    let dir = tempfile::tempdir().unwrap();
    let child = started_run(dir.path(), 5);
    signal(&child, "TERM");
    let out = child.wait_with_output().unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(143), "{err}");
    assert!(err.contains("interrupted by SIGTERM"), "{err}");
    assert_eq!(complete_checkpoints(dir.path()).len(), 2);
}

/// A second Ctrl-C exits at once with 130; the last complete checkpoint stays readable.
#[test]
fn a_second_sigint_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let child = started_run(dir.path(), 3);
    signal(&child, "INT");
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", stderr(&out));
    let checkpoints = complete_checkpoints(dir.path());
    assert!(!checkpoints.is_empty());
    for c in checkpoints {
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(c.join("state.json")).unwrap()).unwrap();
        assert!(state["step"].as_u64().unwrap() >= 1);
        assert!(c.join("adapter_model.safetensors").exists());
    }
}

/// Without a terminal, the run logs a line every `logging_steps` steps.
#[test]
fn without_a_terminal_progress_is_logged_every_logging_steps() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 4, "logging_steps = 2\n");
    let o = train(&recipe, &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    for step in ["step 2/4: loss", "step 4/4: loss"] {
        assert!(err.contains(step), "{err}");
    }
    assert!(!err.contains("step 3/4"), "{err}");
}

#[test]
fn non_finite_loss_stops_with_exit_3_or_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 4, "");
    // An absurd learning rate makes the loss overflow within a few steps.
    let o = train(
        &recipe,
        &["--set", "train.lr=1e30", "--set", "train.max_grad_norm=0"],
    );
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("at step") && err.contains("skip_nonfinite"),
        "{err}"
    );
    assert!(
        err.contains("micro-batch 1 of 1") || err.contains("gradient norm"),
        "{err}"
    );

    let skipped = train(
        &recipe,
        &[
            "--force",
            "--set",
            "train.lr=1e30",
            "--set",
            "train.max_grad_norm=0",
            "--set",
            "train.skip_nonfinite=true",
        ],
    );
    assert!(skipped.status.success(), "{}", stderr(&skipped));
    let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"skipped_updates\""), "{metrics}");
}

#[test]
fn exit_codes_tell_bad_input_from_runtime_failures() {
    let dir = tempfile::tempdir().unwrap();
    let missing = train(&dir.path().join("nope.toml"), &[]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    let usage = feinschliff(&["train"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
    let both = feinschliff(&["train", "r.toml", "--force", "--resume"])
        .output()
        .unwrap();
    assert_eq!(both.status.code(), Some(2));
    let recipe = write_recipe(dir.path(), 2, "");
    let nothing = train(&recipe, &["--resume"]);
    assert_eq!(nothing.status.code(), Some(2));
    assert!(stderr(&nothing).contains("nothing to resume"));
}

/// A file-size limit stands in for a full disk: the write fails, the run exits with 3, and
/// neither the output nor a temporary file is left behind.
#[test]
fn a_full_disk_is_a_runtime_failure_without_half_written_files() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 3, "");
    let script = format!(
        "trap '' XFSZ; ulimit -f 8 && exec '{}' train '{}'",
        env!("CARGO_BIN_EXE_feinschliff"),
        recipe.display()
    );
    let o = Command::new("sh").args(["-c", &script]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("runtime failure") && err.contains("cannot write"),
        "{err}"
    );
    assert!(!dir.path().join("run").exists());
    let leftovers: Vec<PathBuf> = walk(dir.path())
        .into_iter()
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.contains(".tmp-") || name.ends_with(".tmp")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// An output folder that cannot be created (its parent is a file) is a clear runtime error.
#[test]
fn an_unwritable_output_folder_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let recipe = write_recipe(dir.path(), 2, "");
    std::fs::write(dir.path().join("blocked"), "a file, not a folder").unwrap();
    let o = train(&recipe, &["--set", "output.dir=blocked/run"]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("cannot create") && err.contains("blocked"),
        "{err}"
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
