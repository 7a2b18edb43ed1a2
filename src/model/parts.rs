//! The parts of a checkpoint as read from disk, before the model is built from them.

use super::config::ModelConfig;
use super::tokenizer::ModelTokenizer;
use super::weights::Weights;

/// A checkpoint's parts as read from disk: config, tensors under transformers' names, tokenizer.
pub struct Parts {
    pub config: ModelConfig,
    /// config.json as read, or as the GGUF metadata describes it.
    pub config_json: serde_json::Value,
    pub weights: Weights,
    /// None for a folder without tokenizer.json (a merge needs none).
    pub tokenizer: Option<ModelTokenizer>,
    /// How the weights are stored, for summaries.
    pub storage: String,
}
