//! `feinschliff chat`: talk to a model (and its adapter) through the model's own chat template,
//! with the answer streamed token by token through the KV cache. Interactive (one turn per line,
//! until end of input), one-shot (`--prompt`), or base and adapted side by side (`--compare`).
//! Entry point: [`run`].

pub mod sampling;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::data::template::{ChatTemplate, Message};
use crate::model::{generate, Model};
use sampling::{Sampler, SamplingOptions};

/// What `feinschliff chat` is asked to do.
pub struct ChatOptions {
    pub model: String,
    pub adapter: Option<PathBuf>,
    pub system: Option<String>,
    /// Answer this prompt once and exit (`-`: read it from stdin).
    pub prompt: Option<String>,
    /// Answer with the base model and then with the adapted one.
    pub compare: bool,
    pub sampling: SamplingOptions,
    pub max_new_tokens: usize,
    pub device: String,
}

/// One model in the conversation, with its own history.
struct Speaker {
    label: Option<&'static str>,
    model: Model,
    history: Vec<Message>,
    sampler: Sampler,
}

/// Runs the chat, reading turns from `input` and writing answers to `output`.
pub fn run(opts: &ChatOptions, input: &mut dyn BufRead, output: &mut dyn Write) -> Result<()> {
    if opts.compare && opts.adapter.is_none() {
        bail!("--compare answers with the base and the adapted model: give --adapter DIR");
    }
    let device = crate::device::open(&opts.device)?;
    let base = crate::model::locate(&opts.model, Path::new(&opts.model), None, None)?;
    let load = |adapter: Option<&Path>| -> Result<Model> {
        let mut model = Model::load(&base.dir, None, &device)?;
        if let Some(a) = adapter {
            model.load_adapter(a)?;
        }
        Ok(model)
    };
    let speaker = |label, model| Speaker {
        label,
        model,
        history: opts
            .system
            .iter()
            .map(|s| Message {
                role: "system".into(),
                content: s.clone(),
            })
            .collect(),
        sampler: Sampler::new(opts.sampling),
    };
    let mut speakers = if opts.compare {
        vec![
            speaker(Some("base"), load(None)?),
            speaker(Some("adapted"), load(opts.adapter.as_deref())?),
        ]
    } else {
        vec![speaker(None, load(opts.adapter.as_deref())?)]
    };
    let template = template_of(&speakers[0].model)?;
    let stops = stop_ids(&base.dir, speakers[0].model.tokenizer.eos_id())?;
    let interactive = opts.prompt.is_none() && std::io::stdin().is_terminal();

    if let Some(prompt) = &opts.prompt {
        let prompt = if prompt == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(input, &mut text)
                .context("cannot read the prompt from stdin")?;
            text
        } else {
            prompt.clone()
        };
        for s in &mut speakers {
            answer(
                s,
                &template,
                &stops,
                prompt.trim_end(),
                opts.max_new_tokens,
                output,
            )?;
        }
        return Ok(());
    }
    loop {
        if interactive {
            write!(output, "> ")?;
            output.flush()?;
        }
        let mut line = String::new();
        if input.read_line(&mut line)? == 0 {
            // End of input (Ctrl-D): end the session cleanly.
            if interactive {
                writeln!(output)?;
            }
            return Ok(());
        }
        let turn = line.trim_end_matches(['\n', '\r']);
        if turn.trim().is_empty() {
            continue;
        }
        for s in &mut speakers {
            answer(s, &template, &stops, turn, opts.max_new_tokens, output)?;
        }
    }
}

/// The model's chat template (tokenizer_config.json), with its BOS and EOS strings.
fn template_of(model: &Model) -> Result<ChatTemplate> {
    let t = &model.tokenizer;
    let source = t.chat_template.as_deref().context(
        "the model has no chat template (tokenizer_config.json `chat_template`); chat needs one",
    )?;
    ChatTemplate::new(source, t.bos_token.as_deref(), t.eos_token.as_deref())
}

/// Every token id that ends an answer: `eos_token_id` of generation_config.json and config.json
/// (a number or a list) and the tokenizer's EOS.
pub fn stop_ids(dir: &Path, tokenizer_eos: Option<u32>) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for file in ["generation_config.json", "config.json"] {
        let path = dir.join(file);
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let json: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        match &json["eos_token_id"] {
            Value::Number(n) => ids.extend(n.as_u64()),
            Value::Array(list) => ids.extend(list.iter().filter_map(Value::as_u64)),
            _ => {}
        }
    }
    let mut ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
    ids.extend(tokenizer_eos);
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// The speaker's answer to `turn`, streamed to `output` as it is generated; the history grows by
/// the turn and the answer.
fn answer(
    speaker: &mut Speaker,
    template: &ChatTemplate,
    stops: &[u32],
    turn: &str,
    max_new_tokens: usize,
    output: &mut dyn Write,
) -> Result<()> {
    speaker.history.push(Message {
        role: "user".into(),
        content: turn.to_string(),
    });
    let prompt = template.render(&speaker.history, true)?;
    let tokenizer = &speaker.model.tokenizer;
    let ids = tokenizer.encode(&prompt)?;
    if let Some(label) = speaker.label {
        write!(output, "[{label}] ")?;
    }
    let start = ids.len();
    let mut seqs = vec![ids];
    let mut printed = String::new();
    let mut failed = None;
    let sampler = &mut speaker.sampler;
    generate::decode(
        &speaker.model.lm,
        &mut seqs,
        max_new_tokens,
        tokenizer.pad_id(),
        |logits, seqs| {
            let rows: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            Ok(rows
                .iter()
                .zip(seqs)
                .map(|(row, seen)| sampler.choose(row, seen))
                .collect())
        },
        |_, seq| {
            let last = seq[seq.len() - 1];
            let done = stops.contains(&last);
            let end = if done { seq.len() - 1 } else { seq.len() };
            let text = tokenizer.decode_skipping_special(&seq[start..end])?;
            // A token can end inside a character; print only what is settled.
            if let Some(new) = text.strip_prefix(printed.as_str()) {
                if !new.ends_with('\u{fffd}') {
                    if let Err(e) = write!(output, "{new}").and_then(|()| output.flush()) {
                        failed = Some(e);
                        return Ok(true);
                    }
                    printed = text;
                }
            }
            Ok(done)
        },
    )?;
    if let Some(e) = failed {
        return Err(e).context("cannot write the answer");
    }
    let generated = &seqs[0][start..];
    let end = match generated.last() {
        Some(t) if stops.contains(t) => generated.len() - 1,
        _ => generated.len(),
    };
    let text = tokenizer.decode_skipping_special(&generated[..end])?;
    if let Some(rest) = text.strip_prefix(printed.as_str()) {
        write!(output, "{rest}")?;
    }
    writeln!(output)?;
    speaker.history.push(Message {
        role: "assistant".into(),
        content: text,
    });
    Ok(())
}
