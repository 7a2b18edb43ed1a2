//! The model stage: a Hugging Face checkpoint (config, weights, tokenizer) loaded into the shared
//! decoder, with LoRA adapters attached, saved and loaded in PEFT's format.

pub mod adapter;
pub mod amx;
pub mod base;
pub mod blocks;
pub mod checkpoint;
pub mod config;
mod cpu_slices;
pub mod cross_entropy;
pub mod decoder;
pub mod families;
pub mod generate;
pub mod inspect;
pub mod kv_cache;
pub mod layout;
pub mod linear;
pub mod lora;
pub mod lora_linear;
pub mod matmul;
pub mod new;
pub mod phases;
mod precomputed;
pub mod rms_norm;
pub mod rope;
pub mod sdpa;
mod sdpa_cpu;
mod swiglu;
pub mod tokenizer;
pub mod vector_math;
pub mod weights;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Var};
use std::path::{Path, PathBuf};

pub use base::{locate, BaseModel};
pub use config::ModelConfig;
pub use decoder::{CausalLm, TokenLayout};
pub use lora::{LoraConfig, TargetModules};
pub use tokenizer::ModelTokenizer;

/// A loaded checkpoint: the network, its tokenizer, and the LoRA config when adapters are attached.
pub struct Model {
    pub dir: PathBuf,
    pub lm: CausalLm,
    pub tokenizer: ModelTokenizer,
    pub lora: Option<LoraConfig>,
}

impl Model {
    /// Loads the checkpoint in `dir`; `dtype` None keeps f32 compute (weights converted on load).
    pub fn load(dir: &Path, dtype: Option<DType>, device: &Device) -> Result<Self> {
        if !dir.is_dir() {
            bail!("model folder {} does not exist", dir.display());
        }
        let config = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = weights::Weights::open(dir, dtype.unwrap_or(DType::F32), device)?;
        let lm = CausalLm::load(config, &weights, device).with_context(|| {
            format!(
                "cannot build the {} model from {}",
                "checkpoint",
                dir.display()
            )
        })?;
        let tokenizer = ModelTokenizer::from_dir(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            lm,
            tokenizer,
            lora: None,
        })
    }

    /// Attaches freshly initialised adapters (PEFT init) to the targeted layers; `seed` fixes A.
    pub fn attach_lora(&mut self, config: &LoraConfig, seed: u64) -> Result<()> {
        lora::attach(&mut self.lm, config, seed)?;
        self.lora = Some(config.clone());
        Ok(())
    }

    /// Loads a PEFT adapter folder onto the model.
    pub fn load_adapter(&mut self, dir: &Path) -> Result<()> {
        let config = adapter::load(dir, self.lm.device())?.apply(&mut self.lm)?;
        self.lora = Some(config);
        Ok(())
    }

    /// The trainable tensors with their PEFT names (`base_model.model.<module>.lora_A.weight`).
    pub fn trainable(&self) -> Vec<(String, Var)> {
        lora::trainable(&self.lm)
    }

    /// The short module names that carry adapters (`q_proj`, ...), sorted.
    pub fn adapted_module_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lm
            .linears()
            .into_iter()
            .filter(|(_, l)| l.lora.is_some())
            .filter_map(|(n, _)| n.rsplit('.').next().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Number of trainable LoRA parameters.
    pub fn trainable_parameter_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }
}
