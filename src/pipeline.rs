//! `feinschliff train RECIPE`: the stages of one recipe in order — train, the `[eval]` suites on
//! the base and the adapted model, report.html, `[export]`, `[publish]`. A missed gate fails the
//! run after the reports are written, before anything is exported or published.

use anyhow::{anyhow, bail, Result};

use crate::eval::{self, report, suite::Suite};
use crate::export::html::{self, SuiteResults};
use crate::export::{card, MergeOptions};
use crate::failure::Failure;
use crate::fsutil::StagedDir;
use crate::model::BaseModel;
use crate::publish::PublishOptions;
use crate::recipe::{EvalSection, Recipe};
use crate::train::{self, RunOptions, TrainSummary};

/// Runs the recipe; returns the training summary once every gate passed. The base is located
/// once, here, and every stage names it by its Hub id (or folder name), never by a local path.
pub fn run(recipe: &Recipe, options: RunOptions) -> Result<TrainSummary> {
    let force = options.force;
    let base = recipe.locate_base()?;
    if let Some(p) = &recipe.publish {
        if base.hub_id.is_none() && !p.allow_local_base {
            bail!(
                "recipe {}: [publish] repo {} would name the base by its folder `{}`, not a Hub id; set [model] hub_id = \"org/name\" (or, for a private repo, [publish] allow_local_base = true)",
                recipe.source.display(),
                p.repo,
                base.name()
            );
        }
    }
    let summary = train::run(recipe, &base, options)?;
    let suites = match &recipe.eval {
        Some(section) => evaluate(recipe, section, &summary, &base)?,
        None => Vec::new(),
    };
    let failures: Vec<String> = suites
        .iter()
        .flat_map(|s| s.gates.iter().filter_map(|g| g.failure.clone()))
        .collect();
    html::write(
        &summary.output,
        &html::ReportInput {
            base_model: &base.name(),
            summary: &summary,
            data_summary: &summary.data_summary,
            suites: &suites,
        },
    )?;
    card::write(
        &summary.output,
        &summary.output,
        &base.name(),
        card::Kind::Adapter,
    )?;
    if !failures.is_empty() {
        return Err(anyhow!(
            "{}\n(the adapter and the reports are in {}; nothing was exported or published)",
            failures.join("\n"),
            summary.output.display()
        )
        .context(Failure::GateMissed));
    }
    let mut result_dir = summary.output.clone();
    if let Some(e) = recipe.export.as_ref().filter(|e| e.merge) {
        let opts = MergeOptions {
            adapter: summary.output.clone(),
            out: recipe.resolve(&e.out),
            dtype: e.dtype.map(|d| d.dtype()),
            max_shard_bytes: crate::export::merged::parse_size(&e.max_shard_size)?,
            device: recipe.train.device.clone(),
            force,
            format: e.merged_format(),
        };
        result_dir = crate::export::merge(&opts, &base)?;
        tracing::info!("merged model in {}", result_dir.display());
    }
    if let Some(p) = &recipe.publish {
        let outcome = crate::publish::run(&PublishOptions {
            dir: result_dir,
            repo: p.repo.clone(),
            private: p.private,
            revision: p.revision.clone(),
            create_pr: p.create_pr,
            allow_local_base: p.allow_local_base,
            dry_run: false,
        })?;
        tracing::info!("published {} files to {}", outcome.files.len(), p.repo);
    }
    Ok(summary)
}

/// Scores the base and then the adapted model on every suite (the base weights are loaded once),
/// writes each suite's reports; returns the results and the gates.
fn evaluate(
    recipe: &Recipe,
    section: &EvalSection,
    summary: &TrainSummary,
    base: &BaseModel,
) -> Result<Vec<SuiteResults>> {
    let device = crate::device::open(&recipe.train.device)?;
    let suites = section
        .suites
        .iter()
        .map(|p| Suite::load(&recipe.resolve(p)))
        .collect::<Result<Vec<_>>>()?;
    // The base the adapter was trained on: quantized as it was in training.
    let mut model = train::load_base(recipe, base, &device)?;
    let max_positions = model.lm.config.max_position_embeddings;
    let base_name = base.name();
    let info = |suite: &Suite, adapter: Option<&'static str>| report::RunInfo {
        model: &base_name,
        adapter,
        limit: section.limit,
        max_length: suite.max_length.unwrap_or(max_positions),
        batch_size: suite.batch_size,
    };
    let mut base = Vec::with_capacity(suites.len());
    for suite in suites.iter().filter(|_| section.compare_base) {
        tracing::info!("suite {}: base model", suite.name);
        let results = eval::evaluate(&model, suite, section.limit)?;
        let json = report::results_json(suite, &results, &info(suite, None));
        base.push((results, json));
    }
    let mut base = base.into_iter();
    model.load_adapter(&summary.output)?;
    let mut outcomes = Vec::new();
    for suite in &suites {
        tracing::info!("suite {}: adapted model", suite.name);
        let results = eval::evaluate(&model, suite, section.limit)?;
        let staged = StagedDir::create(&summary.output.join("eval").join(&suite.name), true)?;
        let base_results = base.next();
        let base_scores = match &base_results {
            Some((_, json)) => {
                crate::fsutil::write_atomic(
                    &staged.path().join("base_results.json"),
                    serde_json::to_string_pretty(json)?.as_bytes(),
                )?;
                Some(report::scores_of(json))
            }
            None => None,
        };
        let gates = eval::write_reports(
            staged.path(),
            suite,
            (&results, base_results.as_ref().map(|(r, _)| r.as_slice())),
            &info(suite, Some(".")),
            base_scores.as_ref(),
        )?;
        staged.commit()?;
        outcomes.push(SuiteResults {
            name: suite.name.clone(),
            base: base_results.map(|(results, _)| results),
            adapted: results,
            gates,
        });
    }
    Ok(outcomes)
}
