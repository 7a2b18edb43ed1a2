//! `feinschliff model new`: complete random-initialised checkpoints in Hugging Face layout, with a
//! byte-level BPE tokenizer trained on the German sample data and a ChatML chat template.
//! Deterministic for a seed; used by the tests and the quickstart.

use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde_json::{json, Value};
use std::path::Path;

use super::families;
use super::layout;
use super::weights::save_safetensors;
use crate::fsutil::{write_atomic, StagedDir};

/// The shapes `model new` and `bench` know by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Size {
    /// hidden 64, 2 layers, 4 heads (2 KV), vocabulary 1024: seconds to train on a laptop.
    Tiny,
    /// The SmolLM2-135M shape: hidden 576, 30 layers, 9 heads (3 KV), vocabulary 49152, tied.
    Smol,
    /// The Llama-3.2-1B shape: hidden 2048, 16 layers, 32 heads (8 KV), vocabulary 128256, tied.
    #[value(name = "llama-1b")]
    Llama1b,
}

/// Decoder shape of a named size.
pub struct Shape {
    /// Standard deviation of the random weights (transformers' initializer_range).
    pub init_std: f32,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub vocab: usize,
    /// Width of each attention head; None: hidden / heads. Mistral-Nemo's (128) is less than its
    /// hidden / heads (5120 / 32 = 160), Qwen3's often more.
    pub head_dim: Option<usize>,
}

impl Size {
    pub fn shape(self) -> Shape {
        match self {
            // A tiny model needs larger weights than 0.02 for its logits to be able to move at all.
            Size::Tiny => Shape {
                init_std: 0.2,
                hidden: 64,
                intermediate: 176,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                vocab: 1024,
                head_dim: None,
            },
            Size::Smol => Shape {
                init_std: 0.02,
                hidden: 576,
                intermediate: 1536,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                vocab: 49152,
                head_dim: None,
            },
            Size::Llama1b => Shape {
                init_std: 0.02,
                hidden: 2048,
                intermediate: 8192,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                vocab: 128_256,
                head_dim: None,
            },
        }
    }

    /// Whether the shape ties the LM head to the embeddings (as the models it copies do).
    pub fn tied(self) -> bool {
        self != Size::Tiny
    }
}

/// ChatML, as Qwen2 and many fine-tunes use it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// German text the tokenizer is trained on: the shipped sample datasets, compiled in.
const CORPUS: [&str; 3] = [
    include_str!("../../datasets/handbuch/handbuch.txt"),
    include_str!("../../datasets/support-faq/faq.jsonl"),
    include_str!("../../datasets/support-chat/chats.jsonl"),
];

/// config.json of a new checkpoint.
pub fn config_json(arch: &str, shape: &Shape, tie: bool) -> Result<Value> {
    let family = families::by_model_type(arch)?;
    let mut c = json!({
        "architectures": [family.architecture()],
        "model_type": arch,
        "vocab_size": shape.vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim.unwrap_or(shape.hidden / shape.heads),
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "initializer_range": shape.init_std,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10_000.0,
        "tie_word_embeddings": tie,
        "attention_dropout": 0.0,
        "use_cache": true,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "torch_dtype": "float32",
    });
    let Some(extra) = family.new_config_fields(shape.layers) else {
        bail!(
            "`model new` cannot write `{arch}` checkpoints (it writes no vision tower); it writes: {}",
            families::writable().join(", ")
        );
    };
    if let (Some(c), Some(extra)) = (c.as_object_mut(), extra.as_object()) {
        c.extend(extra.clone());
    }
    Ok(c)
}

/// How transformers initialises a tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, initializer_range)
    Normal,
    Zeros,
    Ones,
}

/// Every tensor of an `arch` checkpoint of `shape`: name, dims and initialisation, in checkpoint order.
pub fn weight_specs(
    arch: &str,
    shape: &Shape,
    tie: bool,
) -> Result<Vec<(String, Vec<usize>, Init)>> {
    let config = super::ModelConfig::from_json(&config_json(arch, shape, tie)?)?;
    let (h, v) = (config.hidden_size, config.vocab_size);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![v, h],
        Init::Normal,
    )];
    let (projections, norms) = (layout::projections(&config), layout::norms(&config));
    // A gain stored as w and applied as (1 + w) starts at 0.
    let norm_init = if config.norm_gain_offset {
        Init::Zeros
    } else {
        Init::Ones
    };
    for l in 0..config.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for proj in &projections {
            let name = format!("{p}.{}", proj.role.path());
            out.push((
                format!("{name}.weight"),
                vec![proj.out, proj.inp],
                Init::Normal,
            ));
            if proj.bias {
                out.push((format!("{name}.bias"), vec![proj.out], Init::Zeros));
            }
        }
        for norm in &norms {
            let name = format!("{p}.{}.weight", norm.path);
            out.push((name, vec![norm.width], norm_init));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], norm_init));
    if !tie {
        out.push(("lm_head.weight".to_string(), vec![v, h], Init::Normal));
    }
    Ok(out)
}

/// Random f32 weights as transformers initialises them, drawn in checkpoint order from one seeded
/// stream (the same seed gives the same checkpoint on every machine).
pub fn random_weights(
    arch: &str,
    shape: &Shape,
    tie: bool,
    seed: u64,
) -> Result<Vec<(String, Tensor)>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(0.0f32, shape.init_std).map_err(|e| anyhow!("{e}"))?;
    let dev = Device::Cpu;
    weight_specs(arch, shape, tie)?
        .into_iter()
        .map(|(name, dims, init)| {
            let t = match init {
                Init::Normal => {
                    let n = dims.iter().product();
                    let v: Vec<f32> = (0..n).map(|_| normal.sample(&mut rng)).collect();
                    Tensor::from_vec(v, dims, &dev)?
                }
                Init::Zeros => Tensor::zeros(dims, DType::F32, &dev)?,
                Init::Ones => Tensor::ones(dims, DType::F32, &dev)?,
            };
            Ok((name, t))
        })
        .collect()
}

/// Trains the byte-level BPE tokenizer on the German sample data.
pub fn train_tokenizer(vocab_size: usize) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::models::TrainerWrapper;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{
        AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, PostProcessorWrapper,
        PreTokenizerWrapper, TokenizerImpl,
    };
    let specials: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let trainer_specials = specials.clone();
    let mut trainer = TrainerWrapper::BpeTrainer(
        BpeTrainerBuilder::new()
            .show_progress(false)
            .vocab_size(vocab_size)
            .min_frequency(2)
            .special_tokens(trainer_specials)
            .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
            .build(),
    );
    let mut tokenizer: TokenizerImpl<
        ModelWrapper,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerImpl::new(ModelWrapper::BPE(BPE::default()));
    tokenizer
        .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false)))
        .with_post_processor(Some(ByteLevel::default().trim_offsets(false)))
        .with_decoder(Some(ByteLevel::default()));
    tokenizer
        .train(&mut trainer, corpus_lines().into_iter())
        .map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    tokenizer
        .add_special_tokens(specials)
        .map_err(|e| anyhow!("cannot add special tokens: {e}"))?;
    Ok(tokenizers::Tokenizer::from(tokenizer))
}

/// The corpus as lines of text (string values of the JSON lines; plain lines of the text file).
fn corpus_lines() -> Vec<String> {
    let mut lines = Vec::new();
    for doc in CORPUS {
        for line in doc.lines().filter(|l| !l.trim().is_empty()) {
            match serde_json::from_str::<Value>(line) {
                Ok(v @ Value::Object(_)) => collect_strings(&v, &mut lines),
                _ => lines.push(line.to_string()),
            }
        }
    }
    lines
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}

/// Writes a complete checkpoint for `arch` and `size` into `out` (refused if it exists, unless
/// `force`), with heads `head_dim` wide when given (else the size's).
pub fn create(
    arch: &str,
    size: Size,
    head_dim: Option<usize>,
    seed: u64,
    out: &Path,
    force: bool,
) -> Result<()> {
    let family = families::by_model_type(arch)?;
    let mut shape = size.shape();
    shape.head_dim = head_dim.or(shape.head_dim);
    let tokenizer = train_tokenizer(shape.vocab)?;
    let trained = tokenizer.get_vocab_size(true);
    if trained > shape.vocab {
        bail!(
            "trained tokenizer has {trained} tokens, more than the {} the shape allows",
            shape.vocab
        );
    }
    // A small corpus may yield fewer merges than asked: the embedding keeps the full size,
    // as many released models pad their vocabulary.
    shape.vocab = shape.vocab.max(trained);
    let tie = family.ties_embeddings() || size.tied();
    let staged = StagedDir::create(out, force)?;
    let dir = staged.path();
    let config = config_json(arch, &shape, tie)?;
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    save_safetensors(
        &random_weights(arch, &shape, tie, seed)?,
        &dir.join("model.safetensors"),
    )?;
    tokenizer
        .save(dir.join("tokenizer.json"), true)
        .map_err(|e| anyhow!("cannot write tokenizer.json: {e}"))?;
    let id = |t: &str| tokenizer.token_to_id(t);
    let tokenizer_config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": null,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": null,
        "add_bos_token": false,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
        "chat_template": CHATML_TEMPLATE,
    });
    write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&tokenizer_config)?.as_bytes(),
    )?;
    let special_map = json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"});
    write_atomic(
        &dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&special_map)?.as_bytes(),
    )?;
    let generation = json!({"eos_token_id": id("<|im_end|>"), "pad_token_id": id("<|endoftext|>"), "do_sample": false});
    write_atomic(
        &dir.join("generation_config.json"),
        serde_json::to_string_pretty(&generation)?.as_bytes(),
    )?;
    staged.commit()?;
    Ok(())
}
