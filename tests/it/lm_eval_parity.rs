//! Parity with lm-evaluation-harness 0.4.13 on a tiny model: per-request log-likelihoods,
//! acc/acc_norm, greedy generations and perplexities equal the golden values that lm-eval
//! computed (tests/fixtures/lm_eval, made by make_lm_eval_fixtures.py), also with tokenizers that
//! add BOS (tests/fixtures/lm_eval_bos, made by make_lm_eval_bos_fixtures.py).

use candle_core::Device;
use feinschliff::eval::{self, suite::Suite, tasks::TaskResult};
use feinschliff::model::Model;
use serde_json::Value;
use std::path::Path;

use super::common::{bos_fixture_model, repo};

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Asserts that `results` match lm-eval's `golden`: log-likelihoods within `tolerance` (absolute),
/// perplexities within 1e-5 (relative), flags, accuracies and generated strings exactly.
fn assert_matches(results: &[TaskResult], golden: &Value, tolerance: f64, what: &str) {
    let task = |name: &str| results.iter().find(|r| r.name == name).unwrap();

    let mc = task("fs_mc");
    let docs = golden["fs_mc"]["docs"].as_array().unwrap();
    assert_eq!(mc.samples.len(), docs.len());
    for (ours, theirs) in mc.samples.iter().zip(docs) {
        let doc = &theirs["doc_id"];
        let (a, b) = (
            ours["loglikelihoods"].as_array().unwrap(),
            theirs["loglikelihoods"].as_array().unwrap(),
        );
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= tolerance,
                "{what}, doc {doc}: loglikelihood {x} vs lm-eval {y}"
            );
        }
        assert_eq!(ours["is_greedy"], theirs["is_greedy"], "{what}, doc {doc}");
        assert_eq!(
            ours["acc"].as_f64(),
            theirs["acc"].as_f64(),
            "{what}, doc {doc}"
        );
        assert_eq!(
            ours["acc_norm"].as_f64(),
            theirs["acc_norm"].as_f64(),
            "{what}, doc {doc}"
        );
        assert_eq!(ours["context"], theirs["requests"][0]["context"]);
    }
    for metric in ["acc", "acc_norm"] {
        let (value, stderr) = mc.metrics[metric];
        assert_eq!(value, golden["fs_mc"][metric].as_f64().unwrap(), "{metric}");
        let want = golden["fs_mc"][format!("{metric}_stderr")]
            .as_f64()
            .unwrap();
        assert!((stderr.unwrap() - want).abs() < 1e-12, "{metric} stderr");
    }

    let generated = task("fs_gen");
    let docs = golden["fs_gen"]["docs"].as_array().unwrap();
    assert_eq!(generated.samples.len(), docs.len());
    for (ours, theirs) in generated.samples.iter().zip(docs) {
        assert_eq!(ours["context"], theirs["context"]);
        assert_eq!(
            ours["prediction"], theirs["raw_response"],
            "{what}, doc {}",
            theirs["doc_id"]
        );
    }

    let ppl = task("fs_ppl");
    let docs = golden["fs_ppl"]["docs"].as_array().unwrap();
    assert_eq!(ppl.samples.len(), docs.len());
    for (ours, theirs) in ppl.samples.iter().zip(docs) {
        let (x, y) = (
            ours["loglikelihood"].as_f64().unwrap(),
            theirs["loglikelihood"].as_f64().unwrap(),
        );
        assert!(
            (x - y).abs() <= tolerance * y.abs().max(1.0),
            "{what}, ppl doc {}: {x} vs {y}",
            theirs["doc_id"]
        );
        assert_eq!(ours["words"], theirs["words"]);
        assert_eq!(ours["bytes"], theirs["bytes"]);
    }
    for metric in ["word_perplexity", "byte_perplexity", "bits_per_byte"] {
        let (value, _) = ppl.metrics[metric];
        let want = golden["fs_ppl"][metric].as_f64().unwrap();
        assert!(
            ((value - want) / want).abs() < 1e-5,
            "{what}, {metric}: {value} vs lm-eval {want}"
        );
    }
}

#[test]
fn scores_equal_lm_eval() {
    let dir = repo().join("tests/fixtures/lm_eval");
    let golden = read_json(&dir.join("golden.json"));
    let suite = Suite::load(&dir.join("suite.toml")).unwrap();
    let model = Model::load(&dir.join("model"), None, &Device::Cpu).unwrap();
    let results = eval::evaluate(&model, &suite, None).unwrap_or_else(|e| panic!("{e:#}"));
    assert_matches(&results, &golden, 1e-4, "no BOS, batch 1");
}

/// Tokenizers that add BOS (Llama 3's post-processor, Llama 2's with add_bos_token), scored at the
/// suite's default batch size (padded batches, shared contexts) and one request at a time.
#[test]
fn scores_with_bos_equal_lm_eval() {
    let fixtures = repo().join("tests/fixtures/lm_eval_bos");
    let mut suite = Suite::load(&fixtures.join("suite.toml")).unwrap();
    assert_eq!(
        suite.batch_size, 8,
        "the suite runs at the default batch size"
    );
    for variant in ["llama3_style", "llama2_style"] {
        let golden = read_json(&fixtures.join(variant).join("golden.json"));
        let dir = bos_fixture_model(variant);
        let model = Model::load(dir.path(), None, &Device::Cpu).unwrap();
        for batch_size in [8, 1] {
            suite.batch_size = batch_size;
            let results = eval::evaluate(&model, &suite, None).unwrap_or_else(|e| panic!("{e:#}"));
            let what = format!("{variant}, batch {batch_size}");
            assert_matches(&results, &golden, 1e-4, &what);
        }
    }
}
