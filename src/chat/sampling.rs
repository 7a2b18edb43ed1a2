//! The next token from a row of logits, as transformers' `generate` picks it: the repetition
//! penalty, then temperature, top-k and top-p, then a draw from the softmax (seeded, so the same
//! seed gives the same text); greedy (the largest logit) when the temperature is 0.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// How tokens are chosen.
#[derive(Debug, Clone, Copy)]
pub struct SamplingOptions {
    /// 0 is greedy decoding.
    pub temperature: f64,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches p (1: all).
    pub top_p: f64,
    /// Divides the positive logits (multiplies the negative ones) of tokens already in the
    /// conversation (1: off), as transformers' RepetitionPenaltyLogitsProcessor.
    pub repetition_penalty: f64,
    pub seed: u64,
}

/// A seeded chooser of next tokens.
pub struct Sampler {
    options: SamplingOptions,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(options: SamplingOptions) -> Self {
        Self {
            options,
            rng: ChaCha8Rng::seed_from_u64(options.seed),
        }
    }

    /// The next token after `seen` (the prompt and what was generated) given its `logits`.
    pub fn choose(&mut self, logits: &[f32], seen: &[u32]) -> u32 {
        let o = self.options;
        let mut scores: Vec<f64> = logits.iter().map(|&l| f64::from(l)).collect();
        if o.repetition_penalty != 1.0 {
            for &t in seen {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s < 0.0 {
                        *s * o.repetition_penalty
                    } else {
                        *s / o.repetition_penalty
                    };
                }
            }
        }
        if o.temperature <= 0.0 {
            return argmax(&scores);
        }
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        if o.top_k > 0 {
            order.truncate(o.top_k);
        }
        let max = scores[order[0]];
        let weights: Vec<f64> = order
            .iter()
            .map(|&i| ((scores[i] - max) / o.temperature).exp())
            .collect();
        let total: f64 = weights.iter().sum();
        let mut kept = weights.len();
        if o.top_p < 1.0 {
            let mut cumulative = 0.0;
            for (n, w) in weights.iter().enumerate() {
                cumulative += w / total;
                if cumulative >= o.top_p {
                    kept = n + 1;
                    break;
                }
            }
        }
        let kept_total: f64 = weights[..kept].iter().sum();
        let mut draw = self.rng.random::<f64>() * kept_total;
        for (n, w) in weights[..kept].iter().enumerate() {
            if draw < *w {
                return order[n] as u32;
            }
            draw -= w;
        }
        order[kept - 1] as u32
    }
}

/// The index of the largest score; the first one wins ties, as torch's argmax.
fn argmax(scores: &[f64]) -> u32 {
    let mut best = 0;
    for (i, s) in scores.iter().enumerate() {
        if *s > scores[best] {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(temperature: f64, top_k: usize, top_p: f64) -> SamplingOptions {
        SamplingOptions {
            temperature,
            top_k,
            top_p,
            repetition_penalty: 1.0,
            seed: 3,
        }
    }

    #[test]
    fn greedy_takes_the_largest_and_top_k_1_is_greedy() {
        let logits = [0.1, 2.0, -1.0, 1.9];
        assert_eq!(Sampler::new(options(0.0, 0, 1.0)).choose(&logits, &[]), 1);
        let mut s = Sampler::new(options(1.5, 1, 1.0));
        assert!((0..20).all(|_| s.choose(&logits, &[]) == 1));
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ 0.64, 0.24, 0.09, 0.03: p = 0.8 keeps the first two.
        let logits = [3.0, 2.0, 1.0, 0.0];
        let mut s = Sampler::new(options(1.0, 0, 0.8));
        let drawn: std::collections::BTreeSet<u32> =
            (0..200).map(|_| s.choose(&logits, &[])).collect();
        assert_eq!(drawn, [0, 1].into());
    }

    #[test]
    fn repetition_penalty_turns_greedy_away_from_seen_tokens() {
        let mut o = options(0.0, 0, 1.0);
        o.repetition_penalty = 2.0;
        assert_eq!(Sampler::new(o).choose(&[2.0, 1.5], &[0]), 1);
    }
}
