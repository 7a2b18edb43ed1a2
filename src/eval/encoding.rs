//! How lm-evaluation-harness 0.4.13 (HFLM, `add_bos_token` unset) turns text into scoring
//! requests: texts get the tokenizer's own special tokens (transformers' `add_special_tokens=True`,
//! e.g. BOS) unless they already begin with them; an empty context becomes lm-eval's prefix token;
//! documents are cut into rolling windows.

use anyhow::Result;

use super::scorer::{Scorer, TokenRequest};

impl Scorer<'_> {
    /// lm-eval's `prefix_token_id`: BOS if the tokenizer has one, else EOS.
    pub fn prefix_token(&self) -> u32 {
        let t = &self.model.tokenizer;
        t.bos_id().or_else(|| t.eos_id()).unwrap_or(0)
    }

    /// lm-eval's `tok_encode`: with the tokenizer's special tokens, except for a text that already
    /// begins with the prefix token's text.
    pub fn tok_encode(&self, text: &str) -> Result<Vec<u32>> {
        let t = &self.model.tokenizer;
        let prefix = t.decode(&[self.prefix_token()])?;
        if text.starts_with(&prefix) {
            t.encode(text)
        } else {
            t.encode_with_special_tokens(text)
        }
    }

    /// lm-eval's `loglikelihood` request: for a context, `_encode_pair` (trailing spaces of the
    /// context move to the continuation, the whole string is tokenized, the continuation is what
    /// follows the context's own tokens); for an empty one, the continuation without special
    /// tokens after the prefix token (unless the continuation begins with it).
    pub fn encode_pair(&self, context: &str, continuation: &str) -> Result<TokenRequest> {
        if context.is_empty() {
            let mut continuation = self.model.tokenizer.encode(continuation)?;
            let prefix = self.prefix_token();
            let context = if continuation.first() == Some(&prefix) {
                vec![continuation.remove(0)]
            } else {
                vec![prefix]
            };
            return Ok(TokenRequest {
                context,
                continuation,
            });
        }
        let whole = self.tok_encode(&format!("{context}{continuation}"))?;
        let mut context = self.tok_encode(context.trim_end_matches(char::is_whitespace))?;
        let continuation = whole[context.len().min(whole.len())..].to_vec();
        if context.is_empty() {
            // A context of whitespace only, with a tokenizer that adds nothing.
            context.push(self.prefix_token());
        }
        Ok(TokenRequest {
            context,
            continuation,
        })
    }

    /// The prompt of a generation as lm-eval's `tok_batch_encode` builds it: with the tokenizer's
    /// special tokens unless the text begins with the BOS string (lm-eval decides this for a
    /// whole batch by its first text; here each text decides for itself), then the last `room`
    /// tokens; an empty prompt is the prefix token.
    pub fn generation_prompt(&self, text: &str, room: usize) -> Result<Vec<u32>> {
        let t = &self.model.tokenizer;
        let starts_with_bos = t.bos_token.as_deref().is_some_and(|b| text.starts_with(b));
        let mut ids = if starts_with_bos {
            t.encode(text)?
        } else {
            t.encode_with_special_tokens(text)?
        };
        if ids.len() > room {
            ids.drain(..ids.len() - room);
        }
        if ids.is_empty() {
            ids.push(self.prefix_token());
        }
        Ok(ids)
    }

    /// The windows lm-eval scores a document with (get_rolling_token_windows with context_len 1,
    /// then make_disjoint_window). `tokens` are the document's [`Scorer::tok_encode`]: with a
    /// tokenizer that adds BOS, the first window predicts that BOS from the prefix token, as
    /// lm-eval does.
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
}
