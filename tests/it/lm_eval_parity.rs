//! Parity with lm-evaluation-harness 0.4.13 on a tiny model: per-request log-likelihoods,
//! acc/acc_norm, greedy generations and perplexities equal the golden values that lm-eval
//! computed (tests/fixtures/lm_eval, made by make_lm_eval_fixtures.py).

use candle_core::Device;
use feinschliff::eval::{self, suite::Suite};
use feinschliff::model::Model;
use serde_json::Value;

use super::common::repo;

#[test]
fn scores_equal_lm_eval() {
    let dir = repo().join("tests/fixtures/lm_eval");
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let suite = Suite::load(&dir.join("suite.toml")).unwrap();
    let model = Model::load(&dir.join("model"), None, &Device::Cpu).unwrap();
    let results = eval::evaluate(&model, &suite, None).unwrap_or_else(|e| panic!("{e:#}"));
    let task = |name: &str| results.iter().find(|r| r.name == name).unwrap();

    let mc = task("fs_mc");
    let docs = golden["fs_mc"]["docs"].as_array().unwrap();
    assert_eq!(mc.samples.len(), docs.len());
    for (ours, theirs) in mc.samples.iter().zip(docs) {
        let (a, b) = (
            ours["loglikelihoods"].as_array().unwrap(),
            theirs["loglikelihoods"].as_array().unwrap(),
        );
        for (x, y) in a.iter().zip(b) {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4,
                "doc {}: loglikelihood {x} vs lm-eval {y}",
                theirs["doc_id"]
            );
        }
        assert_eq!(
            ours["is_greedy"], theirs["is_greedy"],
            "doc {}",
            theirs["doc_id"]
        );
        assert_eq!(
            ours["acc"].as_f64(),
            theirs["acc"].as_f64(),
            "doc {}",
            theirs["doc_id"]
        );
        assert_eq!(
            ours["acc_norm"].as_f64(),
            theirs["acc_norm"].as_f64(),
            "doc {}",
            theirs["doc_id"]
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
    for (ours, theirs) in generated
        .samples
        .iter()
        .zip(golden["fs_gen"]["docs"].as_array().unwrap())
    {
        assert_eq!(ours["context"], theirs["context"]);
        assert_eq!(
            ours["prediction"], theirs["raw_response"],
            "doc {}",
            theirs["doc_id"]
        );
    }

    let ppl = task("fs_ppl");
    for (ours, theirs) in ppl
        .samples
        .iter()
        .zip(golden["fs_ppl"]["docs"].as_array().unwrap())
    {
        let (x, y) = (
            ours["loglikelihood"].as_f64().unwrap(),
            theirs["loglikelihood"].as_f64().unwrap(),
        );
        assert!(
            (x - y).abs() <= 1e-4 * y.abs().max(1.0),
            "ppl doc {}: {x} vs {y}",
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
            "{metric}: {value} vs lm-eval {want}"
        );
    }
}
