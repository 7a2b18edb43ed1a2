//! lm-eval 0.4.13's German tasks, reproduced: every task of evals/german.toml that names an lm-eval
//! task, run on synthetic documents in its dataset's schema (tests/fixtures/lm_eval_german, made
//! by make_german_task_fixtures.py), gives lm-eval's requests, log-likelihoods, generations,
//! filtered responses and metrics; lm-eval's text helpers, filters and answer metrics agree with
//! Feinschliff's on crafted inputs.

use candle_core::Device;
use feinschliff::eval::filters::{FilterPipeline, FilterStep};
use feinschliff::eval::functions::{general_detokenize, lowercase_first_letter, okapi_preprocess};
use feinschliff::eval::metrics::{AnswerMatch, ExactOptions};
use feinschliff::eval::suite::{Suite, TaskConfig, TaskKind};
use feinschliff::eval::tasks::{documents, TaskResult};
use feinschliff::eval::{self};
use feinschliff::model::Model;
use serde_json::Value;
use std::path::PathBuf;

use super::common::repo;

fn fixture() -> PathBuf {
    repo().join("tests/fixtures/lm_eval_german")
}

fn golden() -> Value {
    let text = std::fs::read_to_string(fixture().join("golden.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The shipped German suite, reduced to its lm-eval tasks, reading the synthetic documents.
fn lm_eval_tasks_of_the_german_suite() -> Suite {
    let mut suite = Suite::load(&repo().join("evals/german.toml")).unwrap();
    suite.mirror = Some(fixture().to_string_lossy().into_owned());
    suite.tasks.retain(|t| t.lm_eval.is_some());
    suite.gates.clear();
    suite.max_length = Some(golden()["max_length"].as_u64().unwrap() as usize);
    suite
}

fn f64_of(v: &Value) -> f64 {
    v.as_f64()
        .or_else(|| v.as_bool().map(|b| f64::from(u8::from(b))))
        .unwrap_or_else(|| panic!("{v} is not a number"))
}

fn assert_multiple_choice(task: &TaskConfig, ours: &Value, theirs: &Value, what: &str) {
    let choices = ours["choices"].as_array().unwrap();
    let requests = theirs["requests"].as_array().unwrap();
    assert_eq!(choices.len(), requests.len(), "{what}: number of choices");
    for (choice, request) in choices.iter().zip(requests) {
        assert_eq!(ours["context"], request[0], "{what}: context");
        let continuation = format!("{}{}", task.target_delimiter, choice.as_str().unwrap());
        assert_eq!(
            continuation,
            request[1].as_str().unwrap(),
            "{what}: continuation"
        );
    }
    let lls = ours["loglikelihoods"].as_array().unwrap();
    let resps = theirs["resps"].as_array().unwrap();
    for (i, (ll, resp)) in lls.iter().zip(resps).enumerate() {
        let (x, y) = (ll.as_f64().unwrap(), f64_of(&resp[0]));
        assert!(
            (x - y).abs() <= 1e-4,
            "{what}, choice {i}: {x} vs lm-eval {y}"
        );
        assert_eq!(
            ours["is_greedy"][i], resp[1],
            "{what}, choice {i}: is_greedy"
        );
    }
    for (key, value) in theirs["metrics"].as_object().unwrap() {
        let metric = key.strip_suffix(",none").unwrap_or(key);
        assert_eq!(f64_of(&ours[metric]), f64_of(value), "{what}: {key}");
    }
}

fn assert_generation(task: &TaskConfig, eos: &str, ours: &Value, theirs: &Value, what: &str) {
    let request = &theirs["requests"][0];
    assert_eq!(ours["context"], request[0], "{what}: context");
    let mut until = task.until.clone();
    if !until.iter().any(|u| u == eos) {
        until.push(eos.to_string());
    }
    assert_eq!(
        serde_json::to_value(&until).unwrap(),
        request[1]["until"],
        "{what}: stop strings"
    );
    assert_eq!(
        task.max_gen_toks as u64,
        request[1]["max_gen_toks"].as_u64().unwrap(),
        "{what}: max_gen_toks"
    );
    assert_eq!(ours["prediction"], theirs["resps"], "{what}: generation");
    for (filter, response) in theirs["filtered_resps"].as_object().unwrap() {
        let mine = match filter.as_str() {
            "none" => &ours["prediction"],
            name => &ours["filtered"][name],
        };
        assert_eq!(mine, response, "{what}: filter {filter}");
    }
    for (key, value) in theirs["metrics"].as_object().unwrap() {
        let metric = key.strip_suffix(",none").unwrap_or(key);
        let (x, y) = (f64_of(&ours[metric]), f64_of(value));
        assert!((x - y).abs() < 1e-12, "{what}: {key} {x} vs lm-eval {y}");
    }
}

/// The task's aggregate metrics equal lm-eval's results (value and standard error).
fn assert_aggregates(result: &TaskResult, theirs: &Value, what: &str) {
    let theirs = theirs.as_object().unwrap();
    let mut compared = 0;
    for (name, (value, stderr)) in &result.metrics {
        let (metric, filter) = name.split_once(',').unwrap_or((name, "none"));
        let want = f64_of(&theirs[&format!("{metric},{filter}")]);
        assert!(
            (value - want).abs() < 1e-12,
            "{what}: {name} {value} vs lm-eval {want}"
        );
        if let Some(want) = theirs[&format!("{metric}_stderr,{filter}")].as_f64() {
            let got = stderr.unwrap();
            assert!(
                (got - want).abs() < 1e-9,
                "{what}: {name} stderr {got} vs {want}"
            );
        }
        compared += 1;
    }
    let theirs_count = theirs
        .keys()
        .filter(|k| k.contains(',') && !k.contains("_stderr"))
        .count();
    assert_eq!(
        compared, theirs_count,
        "{what}: the same metrics as lm-eval"
    );
}

/// A task scores lm-eval's split or names it as the one lm-eval scores, and compares answers
/// with lm-eval's metric options.
fn assert_declares_lm_evals_split_and_options(task: &TaskConfig, theirs: &Value) {
    let lm_eval = task.lm_eval.as_ref().unwrap();
    let their_split = theirs["eval_split"].as_str().unwrap();
    let declared = lm_eval.split.as_ref().or(task.dataset.split.as_ref());
    assert_eq!(
        declared.map(String::as_str),
        Some(their_split),
        "{}: lm-eval scores split `{their_split}`",
        task.name
    );
    for metric in theirs["config"]["metric_list"].as_array().unwrap() {
        for (option, ours) in [
            ("ignore_case", task.ignore_case),
            ("ignore_punctuation", task.ignore_punctuation),
        ] {
            let want = metric[option].as_bool().unwrap_or(false);
            assert_eq!(
                ours, want,
                "{}: {option} of {}",
                task.name, metric["metric"]
            );
        }
    }
}

#[test]
fn german_tasks_equal_lm_eval() {
    let golden = golden();
    let suite = lm_eval_tasks_of_the_german_suite();
    let model = Model::load(
        &repo().join("tests/fixtures/lm_eval/model"),
        None,
        &Device::Cpu,
    )
    .unwrap();
    let eos = model.tokenizer.eos_token.clone().unwrap();
    let results = eval::evaluate(&model, &suite, None).unwrap_or_else(|e| panic!("{e:#}"));
    let golden_tasks = golden["tasks"].as_object().unwrap();
    assert_eq!(
        suite.tasks.len(),
        golden_tasks.len(),
        "every lm-eval task of the suite has a golden"
    );
    for (task, result) in suite.tasks.iter().zip(&results) {
        let lm_eval = task.lm_eval.as_ref().unwrap();
        let reference = &lm_eval.task;
        let theirs = &golden_tasks[reference];
        assert_declares_lm_evals_split_and_options(task, theirs);
        let samples = theirs["samples"].as_array().unwrap();
        assert_eq!(
            result.samples.len(),
            samples.len(),
            "{reference}: documents"
        );
        for (i, (ours, theirs)) in result.samples.iter().zip(samples).enumerate() {
            let what = format!("{reference}, document {i}");
            match task.kind {
                TaskKind::MultipleChoice => assert_multiple_choice(task, ours, theirs, &what),
                TaskKind::Generate => assert_generation(task, &eos, ours, theirs, &what),
                TaskKind::Perplexity => unreachable!("no perplexity task names lm-eval"),
            }
        }
        assert_aggregates(result, &theirs["results"], reference);
    }
}

/// paws-x's process_docs_paraphrases, as the paws_de task's `keep` and `process_docs` do it.
#[test]
fn paws_documents_are_processed_like_lm_eval() {
    let suite = Suite::load(&repo().join("evals/german.toml")).unwrap();
    let paws = suite.tasks.iter().find(|t| t.name == "paws_de").unwrap();
    for case in golden()["functions"]["paws_process_docs"]
        .as_array()
        .unwrap()
    {
        let out = documents::prepare(paws, vec![case["input"].clone()]).unwrap();
        match &case["output"] {
            Value::Null => assert!(out.is_empty(), "{} is dropped", case["input"]),
            want => {
                for field in ["sentence1", "sentence2"] {
                    assert_eq!(out[0][field], want[field], "{}", case["input"]);
                }
            }
        }
    }
}

#[test]
fn text_helpers_equal_lm_eval() {
    let functions = &golden()["functions"];
    let str_of = |v: &Value| v.as_str().unwrap().to_string();
    for case in functions["general_detokenize"].as_array().unwrap() {
        assert_eq!(
            general_detokenize(&str_of(&case["input"])),
            str_of(&case["output"])
        );
    }
    for case in functions["okapi_preprocess"].as_array().unwrap() {
        let got = case["input"]
            .as_str()
            .map_or(" ".to_string(), okapi_preprocess);
        assert_eq!(got, str_of(&case["output"]), "{}", case["input"]);
    }
    assert_eq!(lowercase_first_letter("Übermorgen"), "übermorgen");
}

#[test]
fn generation_filters_equal_lm_eval() {
    let functions = &golden()["functions"];
    let pipeline = |step| FilterPipeline {
        name: "x".into(),
        steps: vec![step],
    };
    let flexible = pipeline(FilterStep::Regex {
        regex_pattern: "(-?[$0-9.,]{2,})|(-?[0-9]+)".into(),
        group_select: -1,
        fallback: "[invalid]".into(),
    })
    .compiled()
    .unwrap();
    for case in functions["regex_flexible_extract"].as_array().unwrap() {
        let input = case["input"].as_str().unwrap();
        assert_eq!(
            flexible.apply(input),
            case["output"].as_str().unwrap(),
            "{input:?}"
        );
    }
    let strip = pipeline(FilterStep::RemoveWhitespace).compiled().unwrap();
    for case in functions["remove_whitespace"].as_array().unwrap() {
        let input = case["input"].as_str().unwrap();
        assert_eq!(
            strip.apply(input),
            case["output"].as_str().unwrap(),
            "{input:?}"
        );
    }
}

#[test]
fn answer_metrics_equal_lm_eval() {
    let functions = &golden()["functions"];
    for case in functions["exact_match"].as_array().unwrap() {
        let options = ExactOptions {
            ignore_case: case["ignore_case"].as_bool().unwrap(),
            ignore_punctuation: case["ignore_punctuation"].as_bool().unwrap(),
        };
        let reference = case["reference"].as_str().unwrap().to_string();
        let prediction = case["prediction"].as_str().unwrap();
        let got = AnswerMatch::Exact.score("exact_match", prediction, &[reference], options);
        assert_eq!(got, f64_of(&case["exact_match"]), "{case}");
    }
    for case in functions["squad"].as_array().unwrap() {
        let reference = case["reference"].as_str().unwrap().to_string();
        let prediction = case["prediction"].as_str().unwrap();
        for metric in ["exact_match", "f1"] {
            let got = AnswerMatch::Squad.score(
                metric,
                prediction,
                std::slice::from_ref(&reference),
                ExactOptions::default(),
            );
            let want = f64_of(&case[metric]);
            assert!((got - want).abs() < 1e-12, "{metric} {case}: {got}");
        }
    }
}
