//! The tokenizer a GGUF file describes in `tokenizer.ggml.*`, rebuilt as transformers 5 rebuilds it
//! (`integrations/gguf/gguf_tokenizer_mapping.py`): byte-level BPE with merges (`gpt2`, as
//! GPT2Tokenizer, split by the `tokenizer.ggml.pre` regex), and SentencePiece-style BPE with scores
//! (`llama`, as LlamaTokenizer, merges from the file or derived from the scores). Control tokens
//! become special tokens, user-defined ones added tokens; BOS/EOS/pad come from their ids and the
//! chat template from `tokenizer.chat_template`.

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

use super::metadata::Metadata;
use super::token_type::{CONTROL, USER_DEFINED};
use crate::model::tokenizer::ModelTokenizer;

/// transformers' split regexes by `tokenizer.ggml.pre`.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN35_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const TEKKEN_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn split_regex(pre: &str) -> Option<&'static str> {
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" | "dbrx" | "smaug-bpe" => LLAMA3_SPLIT,
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" => QWEN2_SPLIT,
        "qwen35" => QWEN35_SPLIT,
        "tekken" => TEKKEN_SPLIT,
        "gpt-4o" | "llama4" | "kanana2" | "talkie" | "minimax-m2" => GPT4O_SPLIT,
        _ => return None,
    })
}

/// The `tokenizer.ggml.pre` that names a split regex (the inverse of [`split_regex`]).
pub fn pre_name(regex: &str) -> Option<&'static str> {
    [
        ("llama-bpe", LLAMA3_SPLIT),
        ("qwen2", QWEN2_SPLIT),
        ("qwen35", QWEN35_SPLIT),
        ("tekken", TEKKEN_SPLIT),
        ("gpt-4o", GPT4O_SPLIT),
    ]
    .into_iter()
    .find(|(_, r)| *r == regex)
    .map(|(name, _)| name)
}

/// The tokenizer of the file at `path` (named as the chat template's source).
pub fn build(meta: &Metadata, path: &Path) -> Result<ModelTokenizer> {
    let model = meta
        .string("tokenizer.ggml.model")?
        .context("metadata key `tokenizer.ggml.model` is missing: the file carries no tokenizer")?;
    let tokens = meta
        .strings("tokenizer.ggml.tokens")?
        .context("metadata key `tokenizer.ggml.tokens` is missing")?;
    let types = meta.uints("tokenizer.ggml.token_type")?;
    let merges = meta.strings("tokenizer.ggml.merges")?;
    let token_of = |key: &str| -> Result<Option<String>> {
        match meta.uint(key)? {
            None => Ok(None),
            Some(id) => tokens
                .get(id as usize)
                .map(|t| Some(t.to_string()))
                .with_context(|| {
                    format!(
                        "metadata key `{key}` is {id}, beyond the {} tokens",
                        tokens.len()
                    )
                }),
        }
    };
    let bos = token_of("tokenizer.ggml.bos_token_id")?;
    let eos = token_of("tokenizer.ggml.eos_token_id")?;
    let pad = token_of("tokenizer.ggml.padding_token_id")?;
    let (json, add_bos_default) = match model {
        "gpt2" => {
            let merges = merges.context("metadata key `tokenizer.ggml.merges` is missing")?;
            (byte_level(&tokens, &merges, meta)?, false)
        }
        "llama" => {
            let scores = meta.floats("tokenizer.ggml.scores")?;
            (sentencepiece(&tokens, merges.as_deref(), scores, meta)?, true)
        }
        other => bail!(
            "metadata key `tokenizer.ggml.model` is `{other}`, which is not supported (supported: gpt2, llama)"
        ),
    };
    let mut json = json;
    json["added_tokens"] = added_tokens(&tokens, types.as_deref(), model == "gpt2");
    let add_bos = meta
        .bool("tokenizer.ggml.add_bos_token")?
        .unwrap_or(add_bos_default);
    let add_eos = meta.bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    json["post_processor"] = template(
        add_bos.then_some(bos.as_deref()).flatten(),
        add_eos.then_some(eos.as_deref()).flatten(),
        &tokens,
    );
    let text = serde_json::to_string(&json)?;
    let inner: tokenizers::Tokenizer = crate::failure::caught(|| text.parse())
        .context("cannot build the tokenizer")?
        .map_err(|e| anyhow!("cannot build the tokenizer: {e}"))?;
    let chat_template = meta.string("tokenizer.chat_template")?.map(str::to_string);
    ModelTokenizer::from_parts(
        inner,
        [bos, eos, pad],
        chat_template,
        Some(path.to_path_buf()),
    )
}

/// `{token: id}`, the last id winning for a token listed twice (as Python's dict does).
fn vocab(tokens: &[String]) -> Map<String, Value> {
    let mut map = Map::new();
    for (i, t) in tokens.iter().enumerate() {
        map.insert(t.clone(), json!(i));
    }
    map
}

/// GPT-2's byte-to-character table (`bytes_to_unicode`).
fn byte_chars() -> Vec<char> {
    let printable =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap_or('?')
            }
        })
        .collect()
}

/// Byte-level BPE (GPT2Tokenizer): tokens outside the byte alphabet are re-spelled in it.
fn byte_level(tokens: &[&str], merges: &[&str], meta: &Metadata) -> Result<Value> {
    let table = byte_chars();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.to_string()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            }
        })
        .collect();
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let pre_tokenizer = match meta.string("tokenizer.ggml.pre")?.and_then(split_regex) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false),
        ]}),
        None => byte_level(true),
    };
    Ok(json!({
        "version": "1.0",
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
            "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab(&spelled),
            "merges": pairs(merges),
        },
    }))
}

/// SentencePiece-style BPE with byte fallback (LlamaTokenizer, not legacy).
fn sentencepiece(
    tokens: &[&str],
    merges: Option<&[&str]>,
    scores: Option<Vec<f32>>,
    meta: &Metadata,
) -> Result<Value> {
    let owned: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
    let merges = match merges {
        Some(m) => pairs(m),
        None => {
            let scores = scores.context(
                "metadata has neither `tokenizer.ggml.merges` nor `tokenizer.ggml.scores`",
            )?;
            if scores.len() != tokens.len() {
                bail!(
                    "metadata key `tokenizer.ggml.scores` has {} entries for {} tokens",
                    scores.len(),
                    tokens.len()
                );
            }
            json!(derive_merges(&owned, &scores))
        }
    };
    let prepend = if meta
        .bool("tokenizer.ggml.add_space_prefix")?
        .unwrap_or(true)
    {
        "first"
    } else {
        "never"
    };
    Ok(json!({
        "version": "1.0",
        "normalizer": null,
        "pre_tokenizer": {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": prepend, "split": false},
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ]},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab(&owned),
            "merges": merges,
        },
    }))
}

/// `"a b"` merges as pairs.
fn pairs(merges: &[&str]) -> Value {
    json!(merges
        .iter()
        .filter_map(|m| m.split_once(' '))
        .map(|(a, b)| [a, b])
        .collect::<Vec<_>>())
}

/// Merges implied by a vocabulary with scores (transformers' `generate_merges`): every split of a
/// token into two tokens, best merged score first, ties by shorter left then right part.
fn derive_merges(tokens: &[String], scores: &[f32]) -> Vec<[String; 2]> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut score: HashMap<&str, f32> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        ids.insert(t, i);
        if score.insert(t, scores[i]).is_none() {
            order.push(t);
        }
    }
    let mut merges: Vec<(&str, &str, f32)> = Vec::new();
    for merged in order {
        let mut local: Vec<(&str, &str, f32)> = merged
            .char_indices()
            .skip(1)
            .map(|(at, _)| merged.split_at(at))
            .filter(|(l, r)| ids.contains_key(l) && ids.contains_key(r))
            .map(|(l, r)| (l, r, score[merged]))
            .collect();
        local.sort_by_key(|(l, r, _)| (ids[l], ids[r]));
        merges.extend(local);
    }
    let key = |m: &(&str, &str, f32)| (m.2, m.0.chars().count(), m.1.chars().count());
    merges.sort_by(|a, b| {
        key(b)
            .partial_cmp(&key(a))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    merges
        .into_iter()
        .map(|(l, r, _)| [l.to_string(), r.to_string()])
        .collect()
}

/// Control tokens as special tokens, user-defined ones as plain added tokens; in a byte-level
/// vocabulary a control token spelled outside the byte alphabet is a mislabel and skipped.
fn added_tokens(tokens: &[&str], types: Option<&[u64]>, byte_level: bool) -> Value {
    let alphabet: std::collections::HashSet<char> = byte_chars().into_iter().collect();
    let Some(types) = types else {
        return json!([]);
    };
    let entry = |id: usize, content: &str, special: bool| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": !special, "special": special})
    };
    let mut out = Vec::new();
    for (id, (token, kind)) in tokens.iter().zip(types).enumerate() {
        match i32::try_from(*kind).unwrap_or_default() {
            CONTROL if !byte_level || token.chars().all(|c| alphabet.contains(&c)) => {
                out.push(entry(id, token, true))
            }
            USER_DEFINED => out.push(entry(id, token, false)),
            _ => {}
        }
    }
    json!(out)
}

/// transformers' post-processor: BOS and/or EOS around each text, or nothing.
fn template(bos: Option<&str>, eos: Option<&str>, tokens: &[&str]) -> Value {
    if bos.is_none() && eos.is_none() {
        return Value::Null;
    }
    let special = |t: &str, type_id: u32| json!({"SpecialToken": {"id": t, "type_id": type_id}});
    let sequence = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let mut single = Vec::new();
    let mut pair = Vec::new();
    for (seq, type_id) in [("A", 0), ("B", 1)] {
        let part = if type_id == 0 { &mut single } else { &mut pair };
        part.extend(bos.map(|t| special(t, type_id)));
        part.push(sequence(seq, type_id));
        part.extend(eos.map(|t| special(t, type_id)));
    }
    let pair = [single.clone(), pair].concat();
    let mut specials = Map::new();
    for t in [bos, eos].into_iter().flatten() {
        let ids: Vec<usize> = tokens
            .iter()
            .enumerate()
            .filter(|(_, x)| **x == t)
            .map(|(i, _)| i)
            .take(1)
            .collect();
        specials.insert(t.into(), json!({"id": t, "ids": ids, "tokens": [t]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}
