//! Decoding with a KV cache: the prompts run once, then one new token per row and step, so the
//! cost grows linearly with the number of new tokens. Greedy, or any choice of the next token.

use anyhow::Result;
use candle_core::{Tensor, D};

use super::kv_cache::right_padded;
use super::CausalLm;

/// Extends each sequence by its greedy next tokens until `stop(row, sequence)` says so or
/// `max_tokens` were added. Rows are right-padded with `pad` (which never enters attention).
pub fn greedy(
    lm: &CausalLm,
    seqs: &mut [Vec<u32>],
    max_tokens: usize,
    pad: u32,
    stop: impl FnMut(usize, &[u32]) -> Result<bool>,
) -> Result<()> {
    // The argmax runs where the logits are: only the token ids leave the device.
    let argmax = |logits: &Tensor, _: &[Vec<u32>]| Ok(logits.argmax(D::Minus1)?.to_vec1()?);
    decode(lm, seqs, max_tokens, pad, argmax, stop)
}

/// Like [`greedy`], with the next token of every row chosen by `choose(logits [rows, vocab],
/// sequences)`.
pub fn decode(
    lm: &CausalLm,
    seqs: &mut [Vec<u32>],
    max_tokens: usize,
    pad: u32,
    mut choose: impl FnMut(&Tensor, &[Vec<u32>]) -> Result<Vec<u32>>,
    mut stop: impl FnMut(usize, &[u32]) -> Result<bool>,
) -> Result<()> {
    if max_tokens == 0 || seqs.is_empty() {
        return Ok(());
    }
    let device = lm.device();
    let b = seqs.len();
    if seqs.iter().any(Vec::is_empty) {
        anyhow::bail!("greedy decoding needs at least one prompt token per row");
    }
    let prompts: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    let (ids, real) = right_padded(&prompts, pad, device)?;
    let t = ids.dim(1)?;
    let mut cache = lm.new_cache(b, t + max_tokens);
    let hidden = lm
        .hidden_states_cached(&ids, &real, &mut cache)?
        .reshape((b * t, lm.config.hidden_size))?;
    let last: Vec<u32> = (0..b).map(|r| (r * t + real[r] - 1) as u32).collect();
    let mut last = hidden.index_select(&Tensor::from_vec(last, b, device)?, 0)?;
    let mut done = vec![false; b];
    for step in 0..max_tokens {
        let next = choose(&lm.logits(&last)?, seqs)?;
        let mut feed = Vec::with_capacity(b);
        for (r, tok) in next.into_iter().enumerate() {
            if done[r] {
                feed.push((pad, 0));
                continue;
            }
            seqs[r].push(tok);
            done[r] = stop(r, &seqs[r])?;
            feed.push((tok, usize::from(!done[r])));
        }
        if done.iter().all(|&d| d) || step + 1 == max_tokens {
            break;
        }
        let (ids, real): (Vec<u32>, Vec<usize>) = feed.into_iter().unzip();
        last = lm
            .hidden_states_cached(&Tensor::from_vec(ids, (b, 1), device)?, &real, &mut cache)?
            .reshape((b, lm.config.hidden_size))?;
    }
    Ok(())
}
