//! `feinschliff train RECIPE`: the stages of one recipe in order — train, the `[eval]` suites on
//! the base and the adapted model, `[export]`, `[publish]`. A missed gate fails the run after the
//! reports are written, before anything is exported or published.

use anyhow::{bail, Result};
use std::path::Path;

use crate::eval::{self, report, suite::Suite};
use crate::export::{card, MergeOptions};
use crate::fsutil::StagedDir;
use crate::model::Model;
use crate::publish::PublishOptions;
use crate::recipe::{EvalSection, Recipe};
use crate::train::{self, TrainSummary};

/// Runs the recipe; returns the training summary once every gate passed.
pub fn run(recipe: &Recipe, force: bool) -> Result<TrainSummary> {
    let summary = train::run(recipe, force)?;
    let base_dir = crate::model::locate(
        &recipe.model.base,
        &recipe.resolve(&recipe.model.base),
        recipe.model.revision.as_deref(),
    )?;
    let base_name = train::base_model_name(recipe, &base_dir);
    let failures = match &recipe.eval {
        Some(section) => evaluate(recipe, section, &summary, &base_dir)?,
        None => Vec::new(),
    };
    card::write(
        &summary.output,
        &summary.output,
        &base_name,
        card::Kind::Adapter,
    )?;
    if !failures.is_empty() {
        bail!(
            "{}\n(the adapter and the reports are in {}; nothing was exported or published)",
            failures.join("\n"),
            summary.output.display()
        );
    }
    let mut result_dir = summary.output.clone();
    if let Some(e) = recipe.export.as_ref().filter(|e| e.merge) {
        result_dir = crate::export::merge(&MergeOptions {
            adapter: summary.output.clone(),
            base: Some(base_dir.display().to_string()),
            out: recipe.resolve(&e.out),
            dtype: e.dtype.map(|d| d.dtype()),
            max_shard_bytes: crate::export::merged::parse_size(&e.max_shard_size)?,
            any_base: true,
            force,
        })?;
        tracing::info!("merged model in {}", result_dir.display());
    }
    if let Some(p) = &recipe.publish {
        let outcome = crate::publish::run(&PublishOptions {
            dir: result_dir,
            repo: p.repo.clone(),
            private: p.private,
            revision: p.revision.clone(),
            create_pr: p.create_pr,
            dry_run: false,
        })?;
        tracing::info!("published {} files to {}", outcome.files.len(), p.repo);
    }
    Ok(summary)
}

/// Scores the base and the adapted model on every suite; returns the failed gates' messages.
fn evaluate(
    recipe: &Recipe,
    section: &EvalSection,
    summary: &TrainSummary,
    base_dir: &Path,
) -> Result<Vec<String>> {
    let device = crate::device::open(&recipe.train.device)?;
    let mut failures = Vec::new();
    for path in &section.suites {
        let suite = Suite::load(&recipe.resolve(path))?;
        let mut model = Model::load(base_dir, Some(recipe.model.dtype.dtype()), &device)?;
        let max_length = suite
            .max_length
            .unwrap_or(model.lm.config.max_position_embeddings);
        let info = |adapter: Option<&'static str>| report::RunInfo {
            model: &recipe.model.base,
            adapter,
            limit: section.limit,
            max_length,
            batch_size: suite.batch_size,
        };
        let staged = StagedDir::create(&summary.output.join("eval").join(&suite.name), true)?;
        let base_scores = if section.compare_base {
            tracing::info!("suite {}: base model", suite.name);
            let results = eval::evaluate(&model, &suite, section.limit)?;
            let json = report::results_json(&suite, &results, &info(None));
            crate::fsutil::write_atomic(
                &staged.path().join("base_results.json"),
                serde_json::to_string_pretty(&json)?.as_bytes(),
            )?;
            Some(report::scores_of(&json))
        } else {
            None
        };
        model.load_adapter(&summary.output)?;
        tracing::info!("suite {}: adapted model", suite.name);
        let results = eval::evaluate(&model, &suite, section.limit)?;
        let gates = eval::write_reports(
            staged.path(),
            &suite,
            &results,
            &info(Some(".")),
            base_scores.as_ref(),
        )?;
        failures.extend(gates.into_iter().filter_map(|g| g.failure));
        staged.commit()?;
    }
    Ok(failures)
}
