//! `feinschliff train RECIPE`: the stages of one recipe in order — train, then the `[eval]` suites
//! on the base and the adapted model. A missed gate fails the run after the reports are written.

use anyhow::{bail, Result};

use crate::eval::{self, report, suite::Suite};
use crate::export::card;
use crate::fsutil::StagedDir;
use crate::model::Model;
use crate::recipe::Recipe;
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
    let Some(section) = &recipe.eval else {
        card::write(
            &summary.output,
            &summary.output,
            &base_name,
            card::Kind::Adapter,
        )?;
        return Ok(summary);
    };
    let device = crate::device::open(&recipe.train.device)?;
    let mut failures = Vec::new();
    for path in &section.suites {
        let suite = Suite::load(&recipe.resolve(path))?;
        let mut model = Model::load(&base_dir, Some(recipe.model.dtype.dtype()), &device)?;
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
    card::write(
        &summary.output,
        &summary.output,
        &base_name,
        card::Kind::Adapter,
    )?;
    if !failures.is_empty() {
        bail!(
            "{}\n(the adapter and the reports are in {})",
            failures.join("\n"),
            summary.output.display()
        );
    }
    Ok(summary)
}
