//! The evaluation harness: suites, scoring semantics, reports, gates; the German suite on the
//! shared benchmark data when ../shared is present.

use feinschliff::eval::metrics::{mean_stderr, normalize_answer_de, AnswerMatch, ExactOptions};
use feinschliff::eval::scorer::Scorer;
use feinschliff::eval::suite::Suite;
use feinschliff::eval::{self, EvalOptions};
use feinschliff::model::Model;
use std::path::{Path, PathBuf};

use super::common::{repo, tiny_llama_dir, write_temp};

fn options(suite: &Path, out: &Path) -> EvalOptions {
    EvalOptions {
        model: tiny_llama_dir().display().to_string(),
        adapter: None,
        suite: suite.to_path_buf(),
        tasks: vec![],
        limit: Some(4),
        out: out.to_path_buf(),
        baseline: None,
        device: "cpu".into(),
        force: false,
    }
}

/// A small suite over files in `dir`: one task of each kind, plus `extra` TOML.
fn small_suite(dir: &Path, extra: &str) -> PathBuf {
    std::fs::write(
        dir.join("mc.jsonl"),
        "{\"q\": \"Wo liegt Berlin?\", \"choices\": [\"in Deutschland\", \"in Frankreich\"], \"label\": 0}\n{\"q\": \"Was ist 2+2?\", \"choices\": [\"drei\", \"vier\", \"fünf\"], \"label\": 1}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("gen.jsonl"),
        "{\"q\": \"Hauptstadt?\", \"a\": [\"Berlin\", \"die Stadt Berlin\"]}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("ppl.jsonl"),
        "{\"text\": \"Der Zähler steht im Keller. Bitte lesen Sie ihn einmal im Jahr ab.\"}\n",
    )
    .unwrap();
    let suite = format!(
        r#"name = "small"
max_length = 16

[[task]]
name = "mc"
kind = "multiple_choice"
dataset = {{ path = "mc.jsonl" }}
license = "CC0-1.0"
context = "Frage: {{{{ q }}}}\nAntwort:"
choices = "{{{{ choices | tojson }}}}"
target = "{{{{ label }}}}"

[[task]]
name = "gen"
kind = "generate"
dataset = {{ path = "gen.jsonl" }}
license = "CC BY-NC 4.0"
non_commercial = true
context = "{{{{ q }}}}"
target = "{{{{ a | tojson }}}}"
until = ["\n"]
max_gen_toks = 4

[[task]]
name = "ppl"
kind = "perplexity"
dataset = {{ path = "ppl.jsonl" }}
license = "CC0-1.0"
context = "{{{{ text }}}}"
{extra}"#
    );
    let path = dir.join("suite.toml");
    std::fs::write(&path, suite).unwrap();
    path
}

#[test]
fn reports_follow_lm_eval_schema_and_flag_licenses() {
    let dir = tempfile::tempdir().unwrap();
    let suite = small_suite(dir.path(), "");
    let out = dir.path().join("out");
    let outcome = eval::run(&options(&suite, &out)).unwrap_or_else(|e| panic!("{e:#}"));
    assert!(outcome.failures().is_empty());
    for f in [
        "results.json",
        "samples_mc.jsonl",
        "samples_gen.jsonl",
        "samples_ppl.jsonl",
        "report.md",
        "junit.xml",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let mc = &results["results"]["mc"];
    for key in [
        "acc,none",
        "acc_stderr,none",
        "acc_norm,none",
        "acc_norm_stderr,none",
    ] {
        assert!(mc[key].is_number(), "{key} missing: {mc}");
    }
    assert!(
        results["results"]["ppl"]["word_perplexity,none"]
            .as_f64()
            .unwrap()
            > 1.0
    );
    assert_eq!(
        results["results"]["ppl"]["word_perplexity_stderr,none"],
        "N/A"
    );
    assert_eq!(results["n-samples"]["mc"]["effective"], 2);
    assert_eq!(results["licenses"]["gen"]["non_commercial"], true);
    assert_eq!(results["higher_is_better"]["ppl"]["bits_per_byte"], false);
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(out.join("samples_mc.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(first["loglikelihoods"].as_array().unwrap().len(), 2);
    assert_eq!(first["context"], "Frage: Wo liegt Berlin?\nAntwort:");
    let md = std::fs::read_to_string(out.join("report.md")).unwrap();
    assert!(
        md.contains("| mc | acc |") && md.contains("Non-commercial data:** gen"),
        "{md}"
    );
    let junit = std::fs::read_to_string(out.join("junit.xml")).unwrap();
    assert!(
        junit.contains("<testsuite name=\"small\"") && junit.contains("failures=\"0\""),
        "{junit}"
    );
}

#[test]
fn gates_fail_with_task_metric_value_and_bound() {
    let dir = tempfile::tempdir().unwrap();
    let suite = small_suite(dir.path(), "\n[[gate]]\ntask = \"mc\"\nmetric = \"acc\"\nmin = 1.5\n\n[[gate]]\ntask = \"ppl\"\nmetric = \"word_perplexity\"\nmax_drop = 0.0\n");
    let out = dir.path().join("out");
    let outcome = eval::run(&options(&suite, &out)).unwrap();
    let failures = outcome.failures();
    assert!(
        failures
            .iter()
            .any(|f| f.contains("mc acc") && f.contains("below the minimum 1.5")),
        "{failures:?}"
    );
    assert!(
        failures.iter().any(|f| f.contains("needs a baseline")),
        "{failures:?}"
    );
    assert!(std::fs::read_to_string(out.join("junit.xml"))
        .unwrap()
        .contains("<failure message="));
    // Against a baseline that was better, max_drop fails; against itself it passes.
    let mut base: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("results.json")).unwrap()).unwrap();
    let ppl = base["results"]["ppl"]["word_perplexity,none"]
        .as_f64()
        .unwrap();
    std::fs::write(dir.path().join("same.json"), base.to_string()).unwrap();
    base["results"]["ppl"]["word_perplexity,none"] = serde_json::json!(ppl / 2.0);
    std::fs::write(dir.path().join("better.json"), base.to_string()).unwrap();
    let mut opts = options(&suite, &dir.path().join("out2"));
    opts.baseline = Some(dir.path().join("better.json"));
    let f = eval::run(&opts).unwrap();
    assert!(
        f.failures()
            .iter()
            .any(|m| m.contains("ppl word_perplexity") && m.contains("worse than the baseline")),
        "{:?}",
        f.failures()
    );
    let mut opts = options(&suite, &dir.path().join("out3"));
    opts.baseline = Some(dir.path().join("same.json"));
    let f = eval::run(&opts).unwrap();
    assert!(
        !f.failures().iter().any(|m| m.contains("ppl")),
        "{:?}",
        f.failures()
    );
    // The CLI exits with 1 (a gate was missed, the tool worked) and the message.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_feinschliff"))
        .args([
            "eval",
            "--model",
            tiny_llama_dir().to_str().unwrap(),
            "--suite",
            suite.to_str().unwrap(),
            "--tasks",
            "mc",
            "--out",
        ])
        .arg(dir.path().join("out4"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("below the minimum 1.5"));
}

#[test]
fn malformed_suites_are_named() {
    let cases = [
        ("name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"multiple_choice\"\ndataset = { path = \"d.jsonl\" }\nlicense = \"x\"\ncontext = \"c\"\n", "needs `choices` and `target`"),
        ("name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"perplexity\"\ndataset = { path = \"d.jsonl\" }\nlicense = \"x\"\ncontext = \"c\"\nmetrics = [\"acc\"]\n", "metric `acc` is not one of"),
        ("name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"perplexity\"\ndataset = { path = \"d.jsonl\" }\nlicense = \"x\"\ncontext = \"{{ oops\"\n", "not a valid template"),
        ("name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"perplexity\"\ndataset = { path = \"d.jsonl\" }\nlicense = \"x\"\ncontext = \"c\"\n[[gate]]\ntask = \"b\"\nmetric = \"acc\"\n", "unknown task `b`"),
        ("name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"sorting\"\n", "unknown variant `sorting`"),
        ("name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"perplexity\"\ndataset = { path = \"d.jsonl\" }\ncontext = \"c\"\n", "missing field `license`"),
    ];
    let generate = "name = \"x\"\n[[task]]\nname = \"a\"\nkind = \"generate\"\ndataset = { path = \"d.jsonl\" }\nlicense = \"x\"\ncontext = \"c\"\ntarget = \"t\"\n";
    let generate_cases = [
        ("metrics = [\"f1\"]\nanswer_match = \"exact\"\n", "metric `f1` is not one of exact_match"),
        ("ignore_case = true\n", "need `answer_match = \"exact\"`"),
        ("answer_match = \"fuzzy\"\n", "unknown variant `fuzzy`"),
        ("keep = \"sentence1 and\"\n", "`keep` is not a valid expression"),
        ("process_docs = [{ set = \"q\", to = \"q |\" }]\n", "process_docs step setting `q`"),
        ("[[task.filter]]\nname = \"num\"\nsteps = [{ function = \"regex\", regex_pattern = \"(\" }]\n", "filter `num`: regex_pattern `(` is not a valid regex"),
        ("[[task.filter]]\nname = \"none\"\nsteps = [{ function = \"remove_whitespace\" }]\n", "filter name `none`"),
        ("[[task.filter]]\nname = \"x\"\nsteps = [{ function = \"take_last\" }]\n", "unknown variant `take_last`"),
    ];
    let cases = cases.into_iter().map(|(t, w)| (t.to_string(), w)).chain(
        generate_cases
            .into_iter()
            .map(|(extra, w)| (format!("{generate}{extra}"), w)),
    );
    for (text, want) in cases {
        let (_d, path) = write_temp("suite.toml", &text);
        let err = format!("{:#}", Suite::load(&path).unwrap_err());
        assert!(
            err.contains("suite.toml") && err.contains(want),
            "{want}: {err}"
        );
    }
}

#[test]
fn scorer_splits_and_windows_like_lm_eval() {
    let model = Model::load(tiny_llama_dir(), None, &candle_core::Device::Cpu).unwrap();
    let scorer = Scorer::new(&model, Some(8), 4);
    // Trailing whitespace of the context moves to the continuation.
    let r = scorer.encode_pair("Antwort: ", "Ja").unwrap();
    assert_eq!(r.context, model.tokenizer.encode("Antwort:").unwrap());
    let whole = model.tokenizer.encode("Antwort: Ja").unwrap();
    assert_eq!([r.context.clone(), r.continuation.clone()].concat(), whole);
    // Rolling windows predict every token exactly once, never with more than max_length inputs.
    let tokens: Vec<u32> = (10..40).collect();
    let windows = scorer.rolling_windows(&tokens);
    let predicted: Vec<u32> = windows
        .iter()
        .flat_map(|w| w.continuation.clone())
        .collect();
    assert_eq!(predicted, tokens);
    assert!(windows
        .iter()
        .all(|w| w.context.len() + w.continuation.len() <= 9));
    assert_eq!(windows[0].context, vec![model.tokenizer.eos_id().unwrap()]);
}

#[test]
fn answer_normalisation_is_german_aware() {
    let score = |metric, prediction, reference: &str| {
        AnswerMatch::SquadDe.score(
            metric,
            prediction,
            &[reference.into()],
            ExactOptions::default(),
        )
    };
    assert_eq!(normalize_answer_de("Die Stadt Berlin!"), "stadt berlin");
    assert_eq!(score("exact_match", "der Marktplatz", "Marktplatz"), 1.0);
    assert_eq!(
        AnswerMatch::Squad.score(
            "exact_match",
            "der Marktplatz",
            &["Marktplatz".into()],
            ExactOptions::default()
        ),
        0.0,
        "SQuAD's own normalisation keeps German articles"
    );
    assert!(
        (score("f1", "am Marktplatz 3", "Marktplatz 3 in Lindenau")
            - 2.0 * (2.0 / 3.0) * 0.5 / (2.0 / 3.0 + 0.5))
            .abs()
            < 1e-12
    );
    assert!((mean_stderr(&[1.0, 0.0, 1.0, 0.0]) - (1.0f64 / 3.0 / 4.0).sqrt()).abs() < 1e-12);
}

/// The shipped German suite on the benchmark copies in ../shared (skipped without them).
#[test]
fn german_suite_runs_on_the_shared_benchmarks() {
    if !repo().join("../shared/benchmarks").exists() {
        println!("skipped: ../shared/benchmarks is not present beside the repository");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&repo().join("evals/german.toml"), &dir.path().join("out"));
    opts.limit = Some(3);
    let outcome = eval::run(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    let suite = Suite::load(&repo().join("evals/german.toml")).unwrap();
    for task in &suite.tasks {
        assert!(
            outcome.scores.contains_key(&task.name),
            "{} produced no score",
            task.name
        );
        assert!(dir
            .path()
            .join(format!("out/samples_{}.jsonl", task.name))
            .exists());
    }
    let md = std::fs::read_to_string(dir.path().join("out/report.md")).unwrap();
    assert!(
        md.contains("Non-commercial data:**") && md.contains("xnli_de"),
        "{md}"
    );
}

#[test]
fn domain_suite_runs_on_the_shipped_heldout_data() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(&repo().join("evals/domain.toml"), &dir.path().join("out"));
    opts.limit = Some(2);
    let outcome = eval::run(&opts).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(outcome.scores.len(), 3);
}

/// log p(continuation | context) from one full forward pass of context + continuation.
fn direct_loglikelihood(model: &Model, context: &[u32], continuation: &[u32]) -> f64 {
    use candle_core::{Device, Tensor, D};
    let all: Vec<u32> = context.iter().chain(continuation).copied().collect();
    let input = Tensor::from_slice(&all, (1, all.len()), &Device::Cpu).unwrap();
    let logits = model
        .lm
        .forward(
            &input,
            &feinschliff::model::TokenLayout::causal(1, all.len()),
            None,
        )
        .unwrap()
        .squeeze(0)
        .unwrap();
    let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
    continuation
        .iter()
        .enumerate()
        .map(|(j, &tok)| {
            let row = logprobs.get(context.len() - 1 + j).unwrap();
            row.get(tok as usize).unwrap().to_scalar::<f32>().unwrap() as f64
        })
        .sum()
}

#[test]
fn shared_contexts_and_prefixes_score_as_whole_sequences() {
    use feinschliff::eval::scorer::TokenRequest;
    let model = Model::load(tiny_llama_dir(), None, &candle_core::Device::Cpu).unwrap();
    let scorer = Scorer::new(&model, Some(64), 3);
    // Three questions on one 20-token passage (each with three answers of 1–3 tokens), one
    // context of its own, and a request whose context no other shares.
    let passage: Vec<u32> = (40..60).collect();
    let mut requests = Vec::new();
    for question in [vec![7u32, 8], vec![9], vec![7, 10, 11]] {
        let context: Vec<u32> = passage.iter().chain(&question).copied().collect();
        for answer in [vec![3u32], vec![4, 5], vec![6, 6, 2]] {
            requests.push(TokenRequest {
                context: context.clone(),
                continuation: answer,
            });
        }
    }
    for answer in [vec![12u32], vec![13, 14]] {
        requests.push(TokenRequest {
            context: vec![1, 2, 3],
            continuation: answer,
        });
    }
    requests.push(TokenRequest {
        context: vec![5, 6],
        continuation: vec![7, 8],
    });
    let got = scorer
        .loglikelihood_tokens(&requests, &indicatif::ProgressBar::hidden())
        .unwrap();
    for (r, g) in requests.iter().zip(&got) {
        let want = direct_loglikelihood(&model, &r.context, &r.continuation);
        assert!(
            (g.logprob - want).abs() < 1e-4,
            "{r:?}: {} vs {want}",
            g.logprob
        );
    }
}

#[test]
fn continuations_longer_than_max_length_are_scored_on_what_remains() {
    use feinschliff::eval::scorer::TokenRequest;
    let model = Model::load(tiny_llama_dir(), None, &candle_core::Device::Cpu).unwrap();
    let scorer = Scorer::new(&model, Some(8), 4);
    // The input is (context + continuation)[-9:][:-1], as lm-eval builds it: a continuation of
    // 8 tokens is scored whole after the context's last token; one of 9 or more tokens keeps
    // the last 9 tokens of the request, and its last 8 tokens are scored.
    let context = vec![1u32, 2, 3];
    let requests: Vec<TokenRequest> = [8usize, 9, 12]
        .iter()
        .map(|&n| TokenRequest {
            context: context.clone(),
            continuation: (20..20 + n as u32).collect(),
        })
        .collect();
    let got = scorer
        .loglikelihood_tokens(&requests, &indicatif::ProgressBar::hidden())
        .unwrap();
    for (r, g) in requests.iter().zip(&got) {
        let all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let window = &all[all.len() - 9..];
        let scored = r.continuation.len().min(8);
        let want = direct_loglikelihood(&model, &window[..9 - scored], &window[9 - scored..]);
        assert!(
            (g.logprob - want).abs() < 1e-4,
            "{} tokens: {} vs {want}",
            r.continuation.len(),
            g.logprob
        );
    }
}

#[test]
fn empty_continuations_score_zero_and_no_rows_give_none() {
    use feinschliff::eval::scorer::TokenRequest;
    let model = Model::load(tiny_llama_dir(), None, &candle_core::Device::Cpu).unwrap();
    let scorer = Scorer::new(&model, Some(32), 4);
    let request = |context: Vec<u32>, continuation: Vec<u32>| TokenRequest {
        context,
        continuation,
    };
    let bar = indicatif::ProgressBar::hidden();
    let alone = scorer
        .loglikelihood_tokens(&[request(vec![1, 2, 3], vec![])], &bar)
        .unwrap();
    assert_eq!((alone[0].logprob, alone[0].is_greedy), (0.0, true));
    let mixed = scorer
        .loglikelihood_tokens(
            &[
                request(vec![1, 2, 3], vec![]),
                request(vec![1, 2, 3], vec![7, 8]),
            ],
            &bar,
        )
        .unwrap();
    assert_eq!(mixed[0].logprob, 0.0);
    let want = direct_loglikelihood(&model, &[1, 2, 3], &[7, 8]);
    assert!(
        (mixed[1].logprob - want).abs() < 1e-4,
        "{} vs {want}",
        mixed[1].logprob
    );
    // Asked at no rows at all, the forward pass gives no rows (the last layer's products then
    // have none).
    let device = candle_core::Device::Cpu;
    let input = candle_core::Tensor::new(&[[1u32, 2, 3]], &device).unwrap();
    let none = candle_core::Tensor::from_vec(Vec::<u32>::new(), 0, &device).unwrap();
    let layout = feinschliff::model::TokenLayout::causal(1, 3);
    let hidden = model.lm.hidden_states_at(&input, &layout, &none).unwrap();
    assert_eq!(hidden.dims(), &[0, model.lm.config.hidden_size]);
}

#[test]
fn suites_with_zero_max_length_or_batch_size_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let suite = small_suite(dir.path(), "");
    let text = std::fs::read_to_string(&suite).unwrap();
    for (from, to, key) in [
        ("max_length = 16", "max_length = 0", "`max_length`"),
        ("max_length = 16", "batch_size = 0", "`batch_size`"),
    ] {
        std::fs::write(&suite, text.replace(from, to)).unwrap();
        let err = format!("{:#}", Suite::load(&suite).unwrap_err());
        assert!(
            err.contains("suite.toml") && err.contains(key) && err.contains("at least 1"),
            "{err}"
        );
    }
}

#[test]
fn a_target_that_renders_an_empty_list_names_task_and_document() {
    let model = Model::load(tiny_llama_dir(), None, &candle_core::Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("d.jsonl"),
        "{\"q\": \"A?\", \"choices\": [\"x\", \"y\"], \"a\": [\"x\"]}\n{\"q\": \"B?\", \"choices\": [\"x\", \"y\"], \"a\": []}\n",
    )
    .unwrap();
    for (kind, extra) in [
        ("multiple_choice", "choices = \"{{ choices | tojson }}\""),
        ("generate", "max_gen_toks = 2"),
    ] {
        let path = dir.path().join("suite.toml");
        std::fs::write(
            &path,
            format!(
                "name = \"s\"\nmax_length = 16\n[[task]]\nname = \"t\"\nkind = \"{kind}\"\ndataset = {{ path = \"d.jsonl\" }}\nlicense = \"x\"\ncontext = \"{{{{ q }}}}\"\ntarget = \"{{{{ a | tojson }}}}\"\n{extra}\n"
            ),
        )
        .unwrap();
        let suite = Suite::load(&path).unwrap();
        let err = format!("{:#}", eval::evaluate(&model, &suite, None).unwrap_err());
        assert!(
            err.contains("task `t`, document 2") && err.contains("empty list"),
            "{kind}: {err}"
        );
    }
}
