//! Batched scoring with lm-evaluation-harness's semantics: log-likelihood of a continuation given a
//! context (split and truncated as lm-eval's HFLM does), rolling-window log-likelihood of whole
//! documents, and greedy generation until stop strings.

use anyhow::Result;
use candle_core::{Tensor, D};
use indicatif::ProgressBar;

use crate::data::Batch;
use crate::model::{blocks, cross_entropy, Model, TokenLayout};

/// The log-likelihood of one continuation, and whether greedy decoding would produce it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loglikelihood {
    pub logprob: f64,
    pub is_greedy: bool,
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
            max_length,
            batch_size: batch_size.max(1),
        }
    }

    /// The token prepended when a context is empty: BOS if the model has one, else EOS.
    fn prefix_token(&self) -> u32 {
        let t = &self.model.tokenizer;
        t.bos_id().or_else(|| t.eos_id()).unwrap_or(0)
    }

    /// lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, the whole
    /// string is tokenized, and the continuation is what follows the context's own tokens.
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<TokenRequest> {
        let trimmed = context.trim_end_matches(char::is_whitespace);
        let moved = &context[trimmed.len()..];
        let continuation = format!("{moved}{continuation}");
        let whole = self
            .model
            .tokenizer
            .encode(&format!("{trimmed}{continuation}"))?;
        let mut context = self.model.tokenizer.encode(trimmed)?;
        let continuation = whole[context.len().min(whole.len())..].to_vec();
        if context.is_empty() {
            context.push(self.prefix_token());
        }
        Ok(TokenRequest {
            context,
            continuation,
        })
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

    /// Log-likelihoods of token requests, longest first in batches (results in request order).
    pub fn loglikelihood_tokens(
        &self,
        requests: &[TokenRequest],
        bar: &ProgressBar,
    ) -> Result<Vec<Loglikelihood>> {
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by_key(|&i| {
            std::cmp::Reverse(requests[i].context.len() + requests[i].continuation.len())
        });
        let mut out = vec![
            Loglikelihood {
                logprob: 0.0,
                is_greedy: true
            };
            requests.len()
        ];
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
        // (context + continuation)[-(max_length + 1):][:-1], as lm-eval builds its inputs.
        let inputs: Vec<(Vec<u32>, usize)> = requests
            .iter()
            .map(|r| {
                let mut all: Vec<u32> = r.context.iter().chain(&r.continuation).copied().collect();
                let keep = all.len().min(self.max_length + 1);
                all.drain(..all.len() - keep);
                all.pop();
                (all, r.continuation.len())
            })
            .collect();
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
        for (k, ((ids, cont_len), r)) in inputs.iter().zip(requests).enumerate() {
            let start = ids.len() + 1 - cont_len;
            for (j, &tok) in r.continuation.iter().enumerate() {
                rows.push((k * t + start - 1 + j) as u32);
                targets.push(tok);
            }
        }
        let n = rows.len();
        let device = self.model.lm.device();
        let picked = hidden.index_select(&Tensor::from_vec(rows, n, device)?, 0)?;
        let target_t = Tensor::from_vec(targets.clone(), (n, 1), device)?;
        // Rolling perplexity windows pick thousands of rows: their log-probabilities exist one
        // block of rows at a time, as in training's loss.
        let block = cross_entropy::block_rows(n, self.model.lm.config.vocab_size);
        let (mut lp, mut best) = (Vec::<f32>::with_capacity(n), Vec::<u32>::with_capacity(n));
        for (start, len) in blocks::ranges(n, block) {
            let logits = self.model.lm.logits(&picked.narrow(0, start, len)?)?;
            let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
            lp.extend(
                logprobs
                    .gather(&target_t.narrow(0, start, len)?, 1)?
                    .flatten_all()?
                    .to_dtype(candle_core::DType::F32)?
                    .to_vec1::<f32>()?,
            );
            best.extend(logprobs.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        let mut out = Vec::with_capacity(requests.len());
        let mut pos = 0;
        for r in requests {
            let len = r.continuation.len();
            let logprob = lp[pos..pos + len].iter().map(|&v| v as f64).sum();
            let is_greedy = best[pos..pos + len] == targets[pos..pos + len];
            out.push(Loglikelihood { logprob, is_greedy });
            pos += len;
        }
        Ok(out)
    }

    /// The windows lm-eval scores a document with (get_rolling_token_windows with context_len 1,
    /// then make_disjoint_window).
    pub fn rolling_windows(&self, tokens: &[u32]) -> Vec<TokenRequest> {
        let max = self.max_length;
        if tokens.is_empty() {
            return Vec::new();
        }
        let mut windows: Vec<(Vec<u32>, Vec<u32>)> = Vec::new();
        let first = max.min(tokens.len());
        let mut context = vec![self.prefix_token()];
        context.extend_from_slice(&tokens[..first - 1]);
        windows.push((context, tokens[..first].to_vec()));
        let mut predicted = first;
        while predicted < tokens.len() {
            let pred_len = (tokens.len() - predicted).min(max);
            let end = predicted + pred_len;
            let start = end.saturating_sub(max + 1);
            windows.push((
                tokens[start..end - 1].to_vec(),
                tokens[end - pred_len..end].to_vec(),
            ));
            predicted += pred_len;
        }
        windows
            .into_iter()
            .map(|(a, b)| {
                let keep = a.len() - (b.len() - 1);
                TokenRequest {
                    context: a[..keep].to_vec(),
                    continuation: b,
                }
            })
            .collect()
    }

    /// Greedy continuations of `contexts`, cut at the first stop string, at most `max_tokens` tokens.
    pub fn generate(
        &self,
        contexts: &[String],
        until: &[String],
        max_tokens: usize,
        bar: &ProgressBar,
    ) -> Result<Vec<String>> {
        let eos = self.model.tokenizer.eos_id();
        let mut outputs = Vec::with_capacity(contexts.len());
        for chunk in contexts.chunks(self.batch_size) {
            let mut seqs: Vec<Vec<u32>> = Vec::new();
            for c in chunk {
                let mut ids = self.model.tokenizer.encode(c)?;
                let room = self.max_length.saturating_sub(max_tokens).max(1);
                if ids.len() > room {
                    ids.drain(..ids.len() - room);
                }
                if ids.is_empty() {
                    ids.push(self.prefix_token());
                }
                seqs.push(ids);
            }
            let starts: Vec<usize> = seqs.iter().map(Vec::len).collect();
            let mut done = vec![false; seqs.len()];
            for _ in 0..max_tokens {
                let active: Vec<usize> = (0..seqs.len()).filter(|&i| !done[i]).collect();
                if active.is_empty() {
                    break;
                }
                let next =
                    self.next_tokens(&active.iter().map(|&i| &seqs[i]).collect::<Vec<_>>())?;
                for (&i, tok) in active.iter().zip(next) {
                    seqs[i].push(tok);
                    let text = self.model.tokenizer.decode(&seqs[i][starts[i]..])?;
                    if Some(tok) == eos || until.iter().any(|u| text.contains(u.as_str())) {
                        done[i] = true;
                    }
                }
            }
            for (i, s) in seqs.iter().enumerate() {
                let mut cont: &[u32] = &s[starts[i]..];
                if let (Some(e), Some(last)) = (eos, cont.last()) {
                    if *last == e {
                        cont = &cont[..cont.len() - 1];
                    }
                }
                let mut text = self.model.tokenizer.decode(cont)?;
                for u in until {
                    if let Some(p) = text.find(u.as_str()) {
                        text.truncate(p);
                    }
                }
                outputs.push(text);
            }
            bar.inc(chunk.len() as u64);
        }
        Ok(outputs)
    }

    /// The argmax next token of each sequence.
    fn next_tokens(&self, seqs: &[&Vec<u32>]) -> Result<Vec<u32>> {
        let t = seqs.iter().map(|s| s.len()).max().unwrap_or(1);
        let b = seqs.len();
        let pad = self.model.tokenizer.pad_id();
        let mut ids = vec![pad; b * t];
        for (r, s) in seqs.iter().enumerate() {
            ids[r * t..r * t + s.len()].copy_from_slice(s);
        }
        let device = self.model.lm.device();
        let input = Tensor::from_vec(ids, (b, t), device)?;
        let hidden = self
            .model
            .lm
            .hidden_states(&input, &TokenLayout::causal(b, t), None)?
            .reshape((b * t, ()))?;
        let rows: Vec<u32> = seqs
            .iter()
            .enumerate()
            .map(|(r, s)| (r * t + s.len() - 1) as u32)
            .collect();
        let picked = hidden.index_select(&Tensor::from_vec(rows, b, device)?, 0)?;
        Ok(self
            .model
            .lm
            .logits(&picked)?
            .argmax(D::Minus1)?
            .to_vec1()?)
    }
}
