//! Batched scoring with lm-evaluation-harness's semantics: log-likelihood of a continuation given a
//! context (split and truncated as lm-eval's HFLM does), rolling-window log-likelihood of whole
//! documents, and greedy generation until stop strings (how text becomes these requests:
//! `encoding.rs`).
//!
//! Requests that share their context (the choices of a multiple-choice question) read it once:
//! the context runs into a KV cache, then every continuation runs against the cached context.
//! Generation reads the prompt once and then one new token per step through the cache.

use anyhow::Result;
use candle_core::{Tensor, D};
use indicatif::ProgressBar;
use std::collections::HashMap;

use crate::data::Batch;
use crate::model::kernels::{blocks, cross_entropy};
use crate::model::kv_cache::right_padded;
use crate::model::{generate, Model};

/// The log-likelihood of one continuation, and whether greedy decoding would produce it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loglikelihood {
    pub logprob: f64,
    pub is_greedy: bool,
}

impl Loglikelihood {
    /// The sum of per-token log-probabilities; greedy when every token was the argmax.
    fn of(tokens: &[(f32, bool)]) -> Self {
        Self {
            logprob: tokens.iter().map(|&(lp, _)| lp as f64).sum(),
            is_greedy: tokens.iter().all(|&(_, greedy)| greedy),
        }
    }
}

/// Contexts that begin with at least this many equal tokens read them once.
const MIN_SHARED_PREFIX: usize = 16;

/// Context groups (requests with one context) whose contexts share their first `prefix` tokens.
struct Family {
    prefix: usize,
    groups: Vec<Vec<usize>>,
}

/// Scores requests against one model.
pub struct Scorer<'a> {
    pub model: &'a Model,
    /// Longest input the model is given (lm-eval's max_length).
    pub max_length: usize,
    pub batch_size: usize,
}

/// A request as token ids: the model reads `context` and is scored on `continuation`.
#[derive(Debug, Clone)]
pub struct TokenRequest {
    pub context: Vec<u32>,
    pub continuation: Vec<u32>,
}

impl<'a> Scorer<'a> {
    pub fn new(model: &'a Model, max_length: Option<usize>, batch_size: usize) -> Self {
        let max_length = max_length.unwrap_or(model.lm.config.max_position_embeddings);
        Self {
            model,
            max_length: max_length.max(1),
            batch_size: batch_size.max(1),
        }
    }

    /// Log-likelihoods of (context, continuation) string pairs.
    pub fn loglikelihood(
        &self,
        pairs: &[(String, String)],
        bar: &ProgressBar,
    ) -> Result<Vec<Loglikelihood>> {
        let requests = pairs
            .iter()
            .map(|(c, x)| self.encode_pair(c, x))
            .collect::<Result<Vec<_>>>()?;
        self.loglikelihood_tokens(&requests, bar)
    }

    /// Log-likelihoods of token requests (results in request order). Requests that share their
    /// context and need no truncation read it once; the others run whole, longest first in batches.
    pub fn loglikelihood_tokens(
        &self,
        requests: &[TokenRequest],
        bar: &ProgressBar,
    ) -> Result<Vec<Loglikelihood>> {
        let mut out = vec![
            Loglikelihood {
                logprob: 0.0,
                is_greedy: true
            };
            requests.len()
        ];
        let mut by_context: HashMap<&[u32], Vec<usize>> = HashMap::new();
        let mut order = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let fits = r.context.len() + r.continuation.len() <= self.max_length + 1;
            if fits && !r.context.is_empty() && !r.continuation.is_empty() {
                by_context.entry(&r.context).or_default().push(i);
            } else {
                order.push(i);
            }
        }
        let mut groups = Vec::new();
        for members in by_context.into_values() {
            if members.len() > 1 {
                groups.push(members);
            } else {
                order.extend(members);
            }
        }
        for batch in self.context_batches(groups, requests) {
            for (i, r) in self.score_shared(&batch, requests)? {
                out[i] = r;
            }
            bar.inc(
                batch
                    .iter()
                    .flat_map(|f| &f.groups)
                    .map(Vec::len)
                    .sum::<usize>() as u64,
            );
        }
        order.sort_by_key(|&i| {
            (
                std::cmp::Reverse(requests[i].context.len() + requests[i].continuation.len()),
                i,
            )
        });
        for chunk in order.chunks(self.batch_size) {
            let scored =
                self.score_batch(&chunk.iter().map(|&i| &requests[i]).collect::<Vec<_>>())?;
            for (&i, r) in chunk.iter().zip(scored) {
                out[i] = r;
            }
            bar.inc(chunk.len() as u64);
        }
        Ok(out)
    }

    fn score_batch(&self, requests: &[&TokenRequest]) -> Result<Vec<Loglikelihood>> {
        let inputs: Vec<(Vec<u32>, &[u32])> =
            requests.iter().map(|r| self.truncated_input(r)).collect();
        let examples: Vec<crate::data::Example> = inputs
            .iter()
            .map(|(ids, _)| {
                crate::data::Example::single(
                    ids.clone(),
                    vec![crate::data::IGNORE_INDEX; ids.len()],
                )
            })
            .collect();
        let refs: Vec<&crate::data::Example> = examples.iter().collect();
        let batch = Batch::pad(&refs, self.model.tokenizer.pad_id(), self.model.lm.device())?;
        let (b, t) = batch.input_ids.dims2()?;
        let hidden = self
            .model
            .lm
            .hidden_states(&batch.input_ids, &batch.layout, None)?
            .reshape((b * t, self.model.lm.config.hidden_size))?;
        let mut rows = Vec::new();
        let mut targets = Vec::new();
        for (k, (ids, scored)) in inputs.iter().enumerate() {
            // The last `scored.len()` inputs predict the scored tokens.
            let start = ids.len() - scored.len();
            for (j, &tok) in scored.iter().enumerate() {
                rows.push((k * t + start + j) as u32);
                targets.push(tok);
            }
        }
        let scored = self.score_rows(&hidden, rows, &targets)?;
        let mut out = Vec::with_capacity(requests.len());
        let mut pos = 0;
        for (_, tokens) in &inputs {
            out.push(Loglikelihood::of(&scored[pos..pos + tokens.len()]));
            pos += tokens.len();
        }
        Ok(out)
    }

    /// The model's input for a request, as lm-eval builds it:
    /// `(context + continuation)[-(max_length + 1):][:-1]`, truncated from the left; and the
    /// continuation tokens that input predicts. A continuation of more than `max_length` tokens
    /// keeps only its last `max_length` (lm-eval 0.4.13 refuses such a request with an assertion;
    /// here it is scored on what remains, with a warning).
    fn truncated_input<'r>(&self, r: &'r TokenRequest) -> (Vec<u32>, &'r [u32]) {
        let mut all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
        let keep = all.len().min(self.max_length + 1);
        all.drain(..all.len() - keep);
        all.pop();
        let scored = r.continuation.len().min(all.len());
        if scored < r.continuation.len() {
            tracing::warn!(
                "a continuation of {} tokens is longer than max_length {}: only its last {scored} tokens are scored",
                r.continuation.len(),
                self.max_length
            );
        }
        (all, &r.continuation[r.continuation.len() - scored..])
    }

    /// Batches for [`Scorer::score_shared`]. A family is up to `batch_size` context groups whose
    /// contexts begin with the same tokens (a passage with several questions, a few-shot
    /// preamble), or one group alone; its prefix is what all its contexts share, minus at least
    /// one token of each. Lone groups are batched `batch_size` at a time by length.
    fn context_batches(
        &self,
        mut groups: Vec<Vec<usize>>,
        requests: &[TokenRequest],
    ) -> Vec<Vec<Family>> {
        let context = |g: &Vec<usize>| &requests[g[0]].context[..];
        groups.sort_by(|a, b| context(a).cmp(context(b)));
        let mut families = Vec::new();
        let mut start = 0;
        while start < groups.len() {
            let first = context(&groups[start]);
            let (mut end, mut prefix) = (start + 1, first.len() - 1);
            while end < groups.len() && end - start < self.batch_size {
                let other = context(&groups[end]);
                let common = first.iter().zip(other).take_while(|(a, b)| a == b).count();
                let common = common.min(prefix).min(other.len() - 1);
                if common < MIN_SHARED_PREFIX {
                    break;
                }
                prefix = common;
                end += 1;
            }
            families.push(Family {
                prefix,
                groups: groups[start..end].to_vec(),
            });
            start = end;
        }
        // A family of several contexts is a batch of its own: batching prefixes of different
        // lengths (and the different rests of the contexts) costs more in padding than it saves.
        let (shared, alone): (Vec<Family>, Vec<Family>) =
            families.into_iter().partition(|f| f.groups.len() > 1);
        let mut batches: Vec<Vec<Family>> = shared.into_iter().map(|f| vec![f]).collect();
        let mut alone = alone;
        alone.sort_by_key(|f| (std::cmp::Reverse(f.prefix), f.groups[0][0]));
        let mut rest = alone.into_iter().peekable();
        while rest.peek().is_some() {
            batches.push(rest.by_ref().take(self.batch_size).collect());
        }
        batches
    }

    /// One batch of families: their prefixes run once each (batched) into a KV cache, the cache
    /// rows are repeated for the family's contexts, whose remaining tokens run next (batched);
    /// then the first continuation token of every request is scored from its context's last
    /// position, and longer continuations run against the cached context, `batch_size`
    /// continuations at a time.
    fn score_shared(
        &self,
        families: &[Family],
        requests: &[TokenRequest],
    ) -> Result<Vec<(usize, Loglikelihood)>> {
        let lm = &self.model.lm;
        let device = lm.device();
        let pad = self.model.tokenizer.pad_id();
        let groups: Vec<&Vec<usize>> = families.iter().flat_map(|f| &f.groups).collect();
        let contexts: Vec<&[u32]> = groups.iter().map(|g| &requests[g[0]].context[..]).collect();
        let longest_continuation = groups
            .iter()
            .copied()
            .flatten()
            .map(|&i| requests[i].continuation.len())
            .max()
            .unwrap_or(1);
        // The prefixes, one row per family.
        let prefixes: Vec<&[u32]> = families
            .iter()
            .map(|f| &requests[f.groups[0][0]].context[..f.prefix])
            .collect();
        let (input, prefix_lens) = right_padded(&prefixes, pad, device)?;
        let mut shared = lm.new_cache(families.len(), input.dim(1)?);
        lm.hidden_states_cached(&input, &prefix_lens, &mut shared)?;
        let family_of: Vec<usize> = families
            .iter()
            .enumerate()
            .flat_map(|(f, family)| std::iter::repeat_n(f, family.groups.len()))
            .collect();
        // The rest of each context, one row per group.
        let rests: Vec<&[u32]> = contexts
            .iter()
            .zip(&family_of)
            .map(|(c, &f)| &c[prefix_lens[f]..])
            .collect();
        let (input, real) = right_padded(&rests, pad, device)?;
        let t = input.dim(1)?;
        let mut cache = shared.select(&family_of, t + longest_continuation)?;
        drop(shared);
        let hidden = lm
            .hidden_states_cached(&input, &real, &mut cache)?
            .reshape((groups.len() * t, lm.config.hidden_size))?;
        let (mut rows, mut firsts) = (Vec::new(), Vec::new());
        for (k, g) in groups.iter().enumerate() {
            for &i in g.iter() {
                rows.push((k * t + real[k] - 1) as u32);
                firsts.push(requests[i].continuation[0]);
            }
        }
        let first = self.score_rows(&hidden, rows, &firsts)?;
        let members: Vec<(usize, usize)> = groups
            .iter()
            .enumerate()
            .flat_map(|(k, g)| g.iter().map(move |&i| (k, i)))
            .collect();
        let mut scored: HashMap<usize, Vec<(f32, bool)>> = members
            .iter()
            .zip(first)
            .map(|(&(_, i), s)| (i, vec![s]))
            .collect();
        let longer: Vec<(usize, usize)> = members
            .into_iter()
            .filter(|&(_, i)| requests[i].continuation.len() > 1)
            .collect();
        for chunk in longer.chunks(self.batch_size) {
            let mut rows_cache = cache.select(
                &chunk.iter().map(|&(k, _)| k).collect::<Vec<_>>(),
                longest_continuation,
            )?;
            let inputs: Vec<&[u32]> = chunk
                .iter()
                .map(|&(_, i)| {
                    let c = &requests[i].continuation;
                    &c[..c.len() - 1]
                })
                .collect();
            let (input, real) = right_padded(&inputs, pad, device)?;
            let tc = input.dim(1)?;
            let hidden = lm
                .hidden_states_cached(&input, &real, &mut rows_cache)?
                .reshape((chunk.len() * tc, lm.config.hidden_size))?;
            let (mut rows, mut targets) = (Vec::new(), Vec::new());
            for (j, &(_, i)) in chunk.iter().enumerate() {
                for (p, &tok) in requests[i].continuation[1..].iter().enumerate() {
                    rows.push((j * tc + p) as u32);
                    targets.push(tok);
                }
            }
            let mut rest = self.score_rows(&hidden, rows, &targets)?.into_iter();
            for &(_, i) in chunk {
                let entry = scored.entry(i).or_default();
                entry.extend(rest.by_ref().take(requests[i].continuation.len() - 1));
            }
        }
        Ok(scored
            .into_iter()
            .map(|(i, s)| (i, Loglikelihood::of(&s)))
            .collect())
    }

    /// The log-probability of each target and whether it is the argmax, at the given `rows` of
    /// `hidden` [n, hidden]. Rolling perplexity windows pick thousands of rows: their
    /// log-probabilities exist one block of rows at a time, as in training's loss.
    fn score_rows(
        &self,
        hidden: &Tensor,
        rows: Vec<u32>,
        targets: &[u32],
    ) -> Result<Vec<(f32, bool)>> {
        let n = rows.len();
        let device = self.model.lm.device();
        let picked = hidden.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
        let target_t = Tensor::from_vec(targets.to_vec(), (n, 1), device)?;
        let block = cross_entropy::block_rows(n, self.model.lm.config.vocab_size);
        let mut out = Vec::with_capacity(n);
        for (start, len) in blocks::ranges(n, block) {
            let logits = self.model.lm.logits(&picked.narrow(0, start, len)?)?;
            let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            let lp = logprobs
                .gather(&target_t.narrow(0, start, len)?, 1)?
                .flatten_all()?
                .to_dtype(candle_core::DType::F32)?
                .to_vec1::<f32>()?;
            let best = logprobs.argmax(D::Minus1)?.to_vec1::<u32>()?;
            let wanted = &targets[start..start + len];
            out.extend(
                lp.into_iter()
                    .zip(best.iter().zip(wanted).map(|(b, w)| b == w)),
            );
        }
        Ok(out)
    }

    /// Greedy continuations of `contexts`, cut at the first stop string, at most `max_tokens` tokens.
    pub fn generate(
        &self,
        contexts: &[String],
        until: &[String],
        max_tokens: usize,
        bar: &ProgressBar,
    ) -> Result<Vec<String>> {
        let tokenizer = &self.model.tokenizer;
        let eos = tokenizer.eos_id();
        // lm-eval also cuts at EOS's text (which decoding usually skips as a special token).
        let eos_text = eos.map(|e| tokenizer.decode(&[e])).transpose()?;
        let stops: Vec<&str> = until
            .iter()
            .map(String::as_str)
            .chain(eos_text.as_deref())
            .filter(|s| !s.is_empty())
            .collect();
        let room = self.max_length.saturating_sub(max_tokens).max(1);
        let mut outputs = Vec::with_capacity(contexts.len());
        for chunk in contexts.chunks(self.batch_size) {
            let mut seqs = chunk
                .iter()
                .map(|c| self.generation_prompt(c, room))
                .collect::<Result<Vec<_>>>()?;
            let starts: Vec<usize> = seqs.iter().map(Vec::len).collect();
            let pad = tokenizer.pad_id();
            generate::greedy(&self.model.lm, &mut seqs, max_tokens, pad, |i, seq| {
                let tok = seq[seq.len() - 1];
                let text = tokenizer.decode(&seq[starts[i]..])?;
                Ok(Some(tok) == eos || until.iter().any(|u| text.contains(u.as_str())))
            })?;
            for (i, s) in seqs.iter().enumerate() {
                // Decoded without special tokens and cut at the first stop string, as lm-eval does.
                let mut text = tokenizer.decode_skipping_special(&s[starts[i]..])?;
                for u in &stops {
                    if let Some(p) = text.find(u) {
                        text.truncate(p);
                    }
                }
                outputs.push(text);
            }
            bar.inc(chunk.len() as u64);
        }
        Ok(outputs)
    }
}
