//! Gradient checkpointing: the forward pass keeps only a block's input and output; the backward
//! pass recomputes the block with the graph on and backpropagates through it. candle has no
//! checkpoint primitive, so a custom op carries the block: its forward hands over the output
//! (computed outside the graph), its backward recomputes and returns the input's gradient, and
//! puts the gradients of the block's trainable variables into a side store that the train step
//! merges.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::precomputed::Precomputed;

/// Trainable-variable gradients by variable, filled during backward passes.
pub type SideGrads = Arc<Mutex<HashMap<TensorId, Tensor>>>;

/// A block whose activations are recomputed in the backward pass (a decoder layer with its
/// context).
pub trait Recompute: Send + Sync + 'static {
    /// The block's output; `track`: whether its trainable variables join the autograd graph.
    fn run(&self, x: &Tensor, track: bool) -> Result<Tensor>;
    /// The trainable variables inside the block.
    fn trainable(&self) -> Vec<Var>;
}

/// Runs `block` on `x` without keeping its activations; gradients arrive in the backward pass.
pub fn forward(block: impl Recompute, x: &Tensor, grads: &SideGrads) -> Result<Tensor> {
    let y = block.run(&x.detach(), false)?;
    // One of the block's trainable variables joins the op so that it is recorded even when x is
    // not tracked (the first layer's input comes from the frozen embeddings).
    let Some(anchor) = block.trainable().into_iter().next() else {
        return block.run(x, true);
    };
    let op = Checkpoint {
        block: Box::new(block),
        grads: grads.clone(),
        output: Precomputed::new(y),
    };
    Ok(x.apply_op2(anchor.as_tensor(), op)?)
}

/// Takes the gradients gathered so far.
pub fn take(grads: &SideGrads) -> HashMap<TensorId, Tensor> {
    grads
        .lock()
        .map(|mut g| std::mem::take(&mut *g))
        .unwrap_or_default()
}

struct Checkpoint {
    block: Box<dyn Recompute>,
    grads: SideGrads,
    output: Precomputed,
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "checkpointed-layer"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        _a: &CpuStorage,
        _la: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _x: &candle_core::CudaStorage,
        _lx: &Layout,
        _a: &candle_core::CudaStorage,
        _la: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.output.cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let input = Var::from_tensor(&x.detach())?;
        let out = self.block.run(input.as_tensor(), true).map_err(|e| {
            candle_core::Error::Msg(format!("recomputing a checkpointed block: {e:#}"))
        })?;
        let store = (out * grad.detach())?.sum_all()?.backward()?;
        let mut side = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradient store poisoned".into()))?;
        for var in self.block.trainable() {
            if let Some(g) = store.get(var.as_tensor()) {
                let sum = match side.remove(&var.id()) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                side.insert(var.id(), sum);
            }
        }
        let grad_x = if x.track_op() {
            store.get(input.as_tensor()).cloned()
        } else {
            None
        };
        Ok((grad_x, None))
    }
}
