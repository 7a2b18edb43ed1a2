//! Batched scoring with lm-evaluation-harness's semantics: log-likelihood of a continuation given a
//! context (split and truncated as lm-eval's HFLM does), rolling-window log-likelihood of whole
//! documents, and greedy generation until stop strings (how text becomes these requests:
//! `encoding.rs`).
//!
//! Requests that share their context (the choices of a multiple-choice question, the questions on
//! one passage) read it once: a family of contexts with a common prefix is one row of a tree
//! layout, the prefix first and every context and continuation a branch that sees what precedes it
//! in its own sequence. Generation reads the prompt once and then one new token per step through a
//! KV cache.

use anyhow::Result;
use candle_core::Tensor;
use indicatif::ProgressBar;
use std::collections::HashMap;

use crate::data::Batch;
use crate::model::kernels::{blocks, cross_entropy};
use crate::model::{generate, Model, TokenLayout};

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

/// Tokens (rows × width) after which a batch of tree rows takes no further row on the CPU. Rows
/// are sorted by length and padded to the batch's first, so a few long rows pad less than
/// `batch_size` of them, while a pass of 1,000 activation rows or more keeps the f32 products near
/// their full rate. Belebele's first 60 questions: 3 % padding instead of 12 %, 14.4–14.9 →
/// 13.0–13.5 s (2,048 tokens: 13.4–13.7 s; 512: as 1,024).
const TOKENS_PER_PASS: usize = 1024;

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
        let t = batch.input_ids.dim(1)?;
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
        let hidden_at = |rows: &Tensor| {
            let lm = &self.model.lm;
            lm.hidden_states_at(&batch.input_ids, &batch.layout, rows)
        };
        let scored = self.score_rows(hidden_at, rows, &targets)?;
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
    /// one token of each. Families are batched by the length of their rows, at most `batch_size`
    /// at a time and, on the CPU, none added once a batch holds [`TOKENS_PER_PASS`] tokens.
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
        // Each family is one row; rows of similar length share a batch, longest first.
        let row_len = |f: &Family| -> usize {
            let groups = f.groups.iter().map(|g| {
                let rest = requests[g[0]].context.len() - f.prefix;
                rest + g
                    .iter()
                    .map(|&i| requests[i].continuation.len() - 1)
                    .sum::<usize>()
            });
            f.prefix + groups.sum::<usize>()
        };
        families.sort_by_key(|f| (std::cmp::Reverse(row_len(f)), f.groups[0][0]));
        let budget = if self.model.lm.device().is_cpu() {
            TOKENS_PER_PASS
        } else {
            usize::MAX
        };
        let mut batches: Vec<Vec<Family>> = Vec::new();
        let mut width = 0;
        for family in families {
            match batches.last_mut() {
                Some(batch) if batch.len() < self.batch_size && batch.len() * width < budget => {
                    batch.push(family)
                }
                _ => {
                    width = row_len(&family);
                    batches.push(vec![family]);
                }
            }
        }
        batches
    }

    /// One batch of families in one forward pass, each family one row of a tree layout
    /// ([`TreeRow`]); then every request's continuation tokens are scored where they are
    /// predicted.
    fn score_shared(
        &self,
        families: &[Family],
        requests: &[TokenRequest],
    ) -> Result<Vec<(usize, Loglikelihood)>> {
        let lm = &self.model.lm;
        let pad = self.model.tokenizer.pad_id();
        let mut parents = Vec::new();
        let rows: Vec<TreeRow> = families
            .iter()
            .map(|f| TreeRow::of(f, requests, &mut parents))
            .collect();
        let width = rows.iter().map(|r| r.ids.len()).max().unwrap_or(0).max(1);
        let mut ids = Vec::with_capacity(rows.len() * width);
        let mut layout = TokenLayout {
            batch: rows.len(),
            seq: width,
            position_ids: Vec::with_capacity(rows.len() * width),
            segment_ids: Vec::with_capacity(rows.len() * width),
            parents,
        };
        let (mut hidden_rows, mut targets, mut members) = (Vec::new(), Vec::new(), Vec::new());
        for (r, row) in rows.into_iter().enumerate() {
            // Right padding: a sample of its own.
            let padding = width - row.ids.len();
            let pad_segment = layout.parents.len() as u32;
            layout.parents.push(None);
            ids.extend(
                row.ids
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad, padding)),
            );
            layout
                .position_ids
                .extend(row.positions.iter().copied().chain(0..padding as u32));
            layout.segment_ids.extend(
                row.segments
                    .iter()
                    .copied()
                    .chain(std::iter::repeat_n(pad_segment, padding)),
            );
            for (i, predicting) in row.scored {
                let continuation = &requests[i].continuation;
                hidden_rows.extend(predicting.iter().map(|&p| (r * width + p) as u32));
                targets.extend_from_slice(continuation);
                members.push((i, continuation.len()));
            }
        }
        let input = Tensor::from_vec(ids, (layout.batch, width), lm.device())?;
        let hidden_at = |rows: &Tensor| lm.hidden_states_at(&input, &layout, rows);
        let scored = self.score_rows(hidden_at, hidden_rows, &targets)?;
        let mut at = 0;
        Ok(members
            .into_iter()
            .map(|(i, len)| {
                at += len;
                (i, Loglikelihood::of(&scored[at - len..at]))
            })
            .collect())
    }

    /// The log-probability of each target and whether it is the argmax, at the given `rows` of a
    /// forward pass whose final hidden states at chosen rows `hidden_at` gives ([n, hidden] for n
    /// row indices). Requests that differ only in a one-token continuation ask the same row (the
    /// choices of a question): each row's logits are computed once. Rolling perplexity windows
    /// pick thousands of rows: their logits exist one block of rows at a time, as in training's
    /// loss.
    fn score_rows(
        &self,
        hidden_at: impl FnOnce(&Tensor) -> Result<Tensor>,
        rows: Vec<u32>,
        targets: &[u32],
    ) -> Result<Vec<(f32, bool)>> {
        let (mut distinct, mut asked) = (Vec::new(), Vec::<Vec<u32>>::new());
        let mut slot_of = HashMap::new();
        let slots: Vec<(usize, usize)> = rows
            .iter()
            .zip(targets)
            .map(|(&row, &target)| {
                let slot = *slot_of.entry(row).or_insert_with(|| {
                    distinct.push(row);
                    asked.push(Vec::new());
                    distinct.len() - 1
                });
                asked[slot].push(target);
                (slot, asked[slot].len() - 1)
            })
            .collect();
        let n = distinct.len();
        if n == 0 {
            // Only empty continuations: nothing to score, no forward pass.
            return Ok(Vec::new());
        }
        let device = self.model.lm.device();
        let picked = hidden_at(&Tensor::from_vec(distinct, n, device)?)?;
        let block = cross_entropy::block_rows(n, self.model.lm.config.vocab_size);
        let mut scored = Vec::with_capacity(n);
        for (start, len) in blocks::ranges(n, block) {
            let logits = self.model.lm.logits(&picked.narrow(0, start, len)?)?;
            scored.extend(cross_entropy::target_logprobs(
                &logits,
                &asked[start..start + len],
            )?);
        }
        Ok(slots.into_iter().map(|(slot, i)| scored[slot][i]).collect())
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

/// One family's tokens as a row of a tree layout: the shared prefix first, then each context's
/// rest as a branch of the prefix, then each continuation's tokens but its last as a branch of its
/// context. Positions continue along each branch, so every token sees what it would see in its
/// own sequence; the prefix is read once and nothing is padded inside the row.
struct TreeRow {
    ids: Vec<u32>,
    positions: Vec<u32>,
    segments: Vec<u32>,
    /// Per request: the indices in the row that predict its continuation's tokens, in order.
    scored: Vec<(usize, Vec<usize>)>,
}

impl TreeRow {
    /// The row of `family`; its samples take the next ids of `parents` (each sample's parent).
    fn of(family: &Family, requests: &[TokenRequest], parents: &mut Vec<Option<u32>>) -> Self {
        let mut row = Self {
            ids: Vec::new(),
            positions: Vec::new(),
            segments: Vec::new(),
            scored: Vec::new(),
        };
        let first = &requests[family.groups[0][0]].context;
        let prefix = row.branch(&first[..family.prefix], 0, None, parents);
        for group in &family.groups {
            let context = &requests[group[0]].context;
            let rest = &context[family.prefix..];
            let own = row.branch(rest, family.prefix, Some(prefix), parents);
            // The context's last token predicts every continuation's first.
            let last = row.ids.len() - 1;
            for &i in group {
                let continuation = &requests[i].continuation;
                let start = row.ids.len();
                if continuation.len() > 1 {
                    let tokens = &continuation[..continuation.len() - 1];
                    row.branch(tokens, context.len(), Some(own), parents);
                }
                let predicting = std::iter::once(last).chain(start..row.ids.len());
                row.scored.push((i, predicting.collect()));
            }
        }
        row
    }

    /// Appends `tokens` at positions from `first_position` as a new sample branching from
    /// `parent`; returns the sample's id.
    fn branch(
        &mut self,
        tokens: &[u32],
        first_position: usize,
        parent: Option<u32>,
        parents: &mut Vec<Option<u32>>,
    ) -> u32 {
        let id = parents.len() as u32;
        parents.push(parent);
        let first = first_position as u32;
        self.ids.extend_from_slice(tokens);
        self.positions.extend(first..first + tokens.len() as u32);
        self.segments.extend(std::iter::repeat_n(id, tokens.len()));
        id
    }
}
