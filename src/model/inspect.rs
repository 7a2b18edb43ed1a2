//! `feinschliff model inspect`: what a checkpoint is (family, shapes, parameters, dtype), and
//! optionally the f32 logits of a text for comparison with other tools.

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use std::fmt::Write as _;
use std::path::Path;

use super::{adapter, weights, Model, ModelTokenizer, TokenLayout};

/// A human-readable summary of the model (and adapter, when attached).
pub fn summary(model: &Model) -> Result<String> {
    let c = &model.lm.config;
    let mut s = String::new();
    writeln!(s, "model        {}", model.dir.display())?;
    writeln!(s, "family       {}", c.model_type)?;
    writeln!(s, "layers       {}", c.num_hidden_layers)?;
    writeln!(
        s,
        "hidden       {} (intermediate {})",
        c.hidden_size, c.intermediate_size
    )?;
    writeln!(
        s,
        "heads        {} query, {} key/value, head_dim {}",
        c.num_attention_heads, c.num_key_value_heads, c.head_dim
    )?;
    writeln!(
        s,
        "vocab        {} (tokenizer {})",
        c.vocab_size,
        model.tokenizer.vocab_size()
    )?;
    writeln!(
        s,
        "embeddings   {}",
        if c.tie_word_embeddings {
            "tied"
        } else {
            "untied"
        }
    )?;
    writeln!(
        s,
        "rope         theta {} scaling {:?}",
        c.rope_theta, c.rope_scaling
    )?;
    if let Some(w) = c.sliding_window {
        match &c.sliding_layers {
            Some(layers) => {
                let n = layers.iter().filter(|s| **s).count();
                writeln!(s, "window       {w} on {n} of {} layers", layers.len())?
            }
            None => writeln!(s, "window       {w}")?,
        }
    }
    if let Some(theta) = c.local_rope_theta {
        writeln!(s, "local rope   theta {theta} on the window layers")?;
    }
    if c.rotary_dim < c.head_dim {
        writeln!(
            s,
            "rotary       {} of {} dimensions",
            c.rotary_dim, c.head_dim
        )?;
    }
    for (what, cap) in [
        ("scores", c.attn_logit_softcapping),
        ("logits", c.final_logit_softcapping),
    ] {
        if let Some(cap) = cap {
            writeln!(s, "softcap      {what} at {cap}")?;
        }
    }
    writeln!(s, "parameters   {}", super::layout::parameter_count(c))?;
    if c.text_model.is_nested() {
        // The rest of a multimodal checkpoint: counted from the file headers, never read.
        let weights = weights::Weights::open(&model.dir, DType::F32, &Device::Cpu)?;
        let others: Vec<String> = weights
            .names()
            .into_iter()
            .filter(|n| c.text_model.module_name(n).is_none())
            .collect();
        let parameters: usize = others
            .iter()
            .filter_map(|n| weights.shape_of(n))
            .map(|shape| shape.iter().product::<usize>())
            .sum();
        writeln!(
            s,
            "multimodal   {}: the above is its language model ({}); the vision tower and projector ({} tensors, {parameters} parameters) stay on disk",
            super::families::by_model_type(&c.model_type)?.architecture(),
            c.text_model.decoder,
            others.len()
        )?;
    }
    writeln!(s, "dtype        {} (stored)", model.storage)?;
    writeln!(
        s,
        "chat         {}",
        if model.tokenizer.chat_template.is_some() {
            "template present"
        } else {
            "no template"
        }
    )?;
    writeln!(s, "special      {}", special_tokens(&model.tokenizer)?)?;
    if let Some(l) = &model.lora {
        writeln!(
            s,
            "adapter      LoRA r {} alpha {} {}on {}; {} trainable parameters",
            l.r,
            l.alpha,
            if l.use_rslora { "(rsLoRA) " } else { "" },
            adapter::adapted_module_names(&model.lm).join(","),
            model.trainable_parameter_count()
        )?;
    }
    Ok(s)
}

/// Which special tokens `tokenizer(text)` adds (training text, eval contexts, `--text`), and why.
fn special_tokens(t: &ModelTokenizer) -> Result<String> {
    let s = &t.specials;
    let named = |ids: &[u32]| -> Result<String> {
        Ok(ids
            .iter()
            .map(|&id| Ok(format!("{} ({id})", t.decode(&[id])?)))
            .collect::<Result<Vec<_>>>()?
            .join(" "))
    };
    let mut out = match (s.prefix.is_empty(), s.suffix.is_empty()) {
        (true, true) => "no BOS/EOS added to text".to_string(),
        (false, true) => format!("BOS added: {} before each text", named(&s.prefix)?),
        (true, false) => format!("{} added after each text", named(&s.suffix)?),
        (false, false) => format!(
            "BOS added: {} before and {} after each text",
            named(&s.prefix)?,
            named(&s.suffix)?
        ),
    };
    write!(
        out,
        ", by tokenizer.json's post-processor ({}); chat templates are encoded as rendered",
        s.post_processor
    )?;
    let adds_bos = t.bos_id().is_some_and(|b| s.prefix.contains(&b));
    if let Some(flag) = t.config_add_bos_token.filter(|&f| f != adds_bos) {
        write!(
            out,
            "; tokenizer_config.json's add_bos_token: {flag} is ignored, as transformers 5 does"
        )?;
    }
    Ok(out)
}

/// Loads `dir` (a folder or Hub repo id, plus an adapter) on the CPU in f32.
pub fn load(dir: &Path, adapter_dir: Option<&Path>) -> Result<Model> {
    let device = Device::Cpu;
    let base = super::locate(&dir.to_string_lossy(), dir, None, None)?;
    let mut model = Model::load(&base.dir, None, &device)?;
    if let Some(a) = adapter_dir {
        model.load_adapter(a)?;
    }
    Ok(model)
}

/// Logits [seq, vocab] of `text` tokenized as transformers' `tokenizer(text)` does (with the
/// special tokens the tokenizer adds), with its input ids.
pub fn logits_of(model: &Model, text: &str) -> Result<(Tensor, Tensor)> {
    let ids = model.tokenizer.encode_with_special_tokens(text)?;
    anyhow::ensure!(!ids.is_empty(), "the text tokenizes to no tokens");
    let n = ids.len();
    let input = Tensor::from_vec(ids.clone(), (1, n), model.lm.device())?;
    let logits = model
        .lm
        .forward(&input, &TokenLayout::causal(1, n), None)?
        .squeeze(0)?;
    let ids = Tensor::from_vec(
        ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        n,
        &Device::Cpu,
    )?;
    Ok((logits, ids))
}

/// Writes `logits` and `input_ids` of `text` to a safetensors file.
pub fn write_logits(model: &Model, text: &str, out: &Path) -> Result<()> {
    let (logits, ids) = logits_of(model, text)?;
    weights::save_safetensors(&[("logits".into(), logits), ("input_ids".into(), ids)], out)
        .with_context(|| format!("cannot write logits to {}", out.display()))
}
