//! Inference that reads shared tokens once equals the full forward pass: contexts read into the
//! KV cache and their continuations read against it, and the branches of a tree row (a prefix
//! read once, the sequences that continue it), give the hidden states of the whole sequences
//! (right padding and sliding windows included); greedy generation with the cache picks the
//! tokens that recomputing every sequence from scratch picks; hidden states asked at a few rows
//! (the last layer's MLP run there only) equal those rows of the full pass.

use super::common::{max_abs_diff, tiny_lm};
use candle_core::{DType, Device, Tensor, D};
use feinschliff::model::{generate, CausalLm, TokenLayout};

/// Hidden states [len, hidden] of one sequence, read whole.
fn whole(lm: &CausalLm, ids: &[u32]) -> Tensor {
    let input = Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap();
    lm.hidden_states(&input, &TokenLayout::causal(1, ids.len()), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
}

fn padded(rows: &[&[u32]], pad: u32) -> (Tensor, Vec<usize>) {
    let t = rows.iter().map(|r| r.len()).max().unwrap();
    let mut ids = vec![pad; rows.len() * t];
    for (i, r) in rows.iter().enumerate() {
        ids[i * t..i * t + r.len()].copy_from_slice(r);
    }
    let real = rows.iter().map(|r| r.len()).collect();
    (
        Tensor::from_vec(ids, (rows.len(), t), &Device::Cpu).unwrap(),
        real,
    )
}

#[test]
fn cached_context_and_continuations_equal_the_whole_sequences() {
    // gemma2: the window on every other layer only, soft-capped scores; phi3: fused projections;
    // gemma3_text: both tiny layers slide, with the local RoPE base.
    for arch in ["llama", "mistral", "qwen2", "phi3", "gemma2", "gemma3_text"] {
        let mut lm = tiny_lm(arch, DType::F64, 3);
        if matches!(arch, "mistral" | "gemma2" | "gemma3_text") {
            // A window shorter than the sequences, so that it matters.
            lm.config.sliding_window = Some(5);
        }
        let contexts: [&[u32]; 2] = [&[5, 9, 13, 2, 7, 7, 1], &[4, 8]];
        let continuations: [&[u32]; 2] = [&[3, 3, 6, 10], &[11]];
        let mut cache = lm.new_cache(2, 4);
        let (input, real) = padded(&contexts, 1);
        let context_hidden = lm.hidden_states_cached(&input, &real, &mut cache).unwrap();
        for (k, c) in contexts.iter().enumerate() {
            let got = context_hidden
                .get(k)
                .unwrap()
                .narrow(0, 0, c.len())
                .unwrap();
            assert!(
                max_abs_diff(&got, &whole(&lm, c)) < 1e-10,
                "{arch} context {k}"
            );
        }
        // Each context's continuation read against its cached row.
        let (input, real) = padded(&continuations[..2], 1);
        let hidden = lm.hidden_states_cached(&input, &real, &mut cache).unwrap();
        for (j, cont) in continuations[..2].iter().enumerate() {
            let full: Vec<u32> = contexts[j].iter().chain(*cont).copied().collect();
            let want = whole(&lm, &full)
                .narrow(0, full.len() - cont.len(), cont.len())
                .unwrap();
            let got = hidden.get(j).unwrap().narrow(0, 0, cont.len()).unwrap();
            assert!(max_abs_diff(&got, &want) < 1e-10, "{arch} continuation {j}");
        }
    }
}

#[test]
fn branches_of_a_tree_row_equal_their_whole_sequences() {
    // Row 0: a prefix, two branches of it, and a branch of the first branch (how the scorer reads
    // the contexts that share a passage, and a longer continuation); row 1: one sample, then
    // padding of its own. Sliding windows count positions, not places in the row.
    for arch in ["llama", "mistral", "gemma2", "gemma3_text"] {
        let mut lm = tiny_lm(arch, DType::F64, 3);
        if arch != "llama" {
            lm.config.sliding_window = Some(5);
        }
        let prefix: &[u32] = &[5, 9, 13, 2];
        let (a, b, c): (&[u32], &[u32], &[u32]) = (&[7, 7, 1], &[4, 8, 6], &[3, 3, 6, 10]);
        let alone: &[u32] = &[4, 8, 12, 0, 2];
        let row0: Vec<u32> = [prefix, a, b, c].concat();
        let width = row0.len();
        let mut ids = row0.clone();
        ids.extend(alone);
        ids.resize(2 * width, 1);
        let mut position_ids: Vec<u32> = [0..4, 4..7, 4..7, 7..11].into_iter().flatten().collect();
        position_ids.extend(0..alone.len() as u32);
        position_ids.extend(0..(width - alone.len()) as u32);
        let mut segment_ids: Vec<u32> = [(0, 4), (1, 3), (2, 3), (3, 4)]
            .iter()
            .flat_map(|&(s, n)| std::iter::repeat_n(s, n))
            .collect();
        segment_ids.extend(std::iter::repeat_n(4, alone.len()));
        segment_ids.extend(std::iter::repeat_n(5, width - alone.len()));
        let layout = TokenLayout {
            batch: 2,
            seq: width,
            position_ids,
            segment_ids,
            parents: vec![None, Some(0), Some(0), Some(1), None, None],
        };
        let input = Tensor::from_vec(ids, (2, width), &Device::Cpu).unwrap();
        let hidden = lm.hidden_states(&input, &layout, None).unwrap();
        let row = |r: usize, start: usize, len: usize| {
            hidden.get(r).unwrap().narrow(0, start, len).unwrap()
        };
        let tail = |seq: Vec<u32>, len: usize| {
            let w = whole(&lm, &seq);
            w.narrow(0, seq.len() - len, len).unwrap()
        };
        let cases = [
            ("prefix", row(0, 0, 4), whole(&lm, prefix)),
            ("a", row(0, 4, 3), tail([prefix, a].concat(), 3)),
            ("b", row(0, 7, 3), tail([prefix, b].concat(), 3)),
            ("c", row(0, 10, 4), tail([prefix, a, c].concat(), 4)),
            ("alone", row(1, 0, alone.len()), whole(&lm, alone)),
        ];
        for (name, got, want) in cases {
            assert!(max_abs_diff(&got, &want) < 1e-10, "{arch} {name}");
        }
    }
}

#[test]
fn greedy_generation_with_the_cache_equals_recomputing() {
    let lm = tiny_lm("llama", DType::F32, 5);
    let prompts = vec![
        vec![3u32, 17, 40, 2],
        vec![9u32],
        vec![1u32, 2, 3, 4, 5, 6, 7],
    ];
    let mut cached = prompts.clone();
    // Row 1 stops after its third token; the others run to the limit.
    generate::greedy(&lm, &mut cached, 12, 0, |row, seq| {
        Ok(row == 1 && seq.len() == 4)
    })
    .unwrap();
    for (p, got) in prompts.iter().zip(&cached) {
        let limit = if p.len() == 1 { 3 } else { 12 };
        let mut seq = p.clone();
        for _ in 0..limit {
            let logits = lm
                .forward(
                    &Tensor::from_slice(&seq, (1, seq.len()), &Device::Cpu).unwrap(),
                    &TokenLayout::causal(1, seq.len()),
                    None,
                )
                .unwrap();
            let next = logits
                .get(0)
                .unwrap()
                .get(seq.len() - 1)
                .unwrap()
                .argmax(D::Minus1)
                .unwrap()
                .to_scalar::<u32>()
                .unwrap();
            seq.push(next);
        }
        assert_eq!(got, &seq);
    }
}

#[test]
fn hidden_states_at_chosen_rows_equal_those_rows_of_the_full_pass() {
    // gemma2: sandwich norms and a sliding window; phi3: fused projections.
    for arch in ["llama", "phi3", "gemma2"] {
        let lm = tiny_lm(arch, DType::F64, 3);
        let (b, t) = (2, 9);
        let ids: Vec<u32> = (0..(b * t) as u32).map(|i| (i * 7 + 3) % 50).collect();
        let input = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
        let layout = TokenLayout::causal(b, t);
        let full = lm.hidden_states(&input, &layout, None).unwrap();
        let full = full.reshape((b * t, full.dim(D::Minus1).unwrap())).unwrap();
        // Out of order and repeated, from both rows.
        let rows = Tensor::new(&[17u32, 0, 5, 9, 5], &Device::Cpu).unwrap();
        let got = lm.hidden_states_at(&input, &layout, &rows).unwrap();
        let want = full.index_select(&rows, 0).unwrap();
        assert_eq!(got.dims(), want.dims(), "{arch}");
        assert!(max_abs_diff(&got, &want) < 1e-10, "{arch}");
    }
}
