//! Gradient checkpointing for decoder layers: the forward pass keeps only each layer's input and
//! output; the backward pass recomputes the layer with the graph on and backpropagates through it.
//! candle has no checkpoint primitive, so a custom op carries the layer: its forward hands over the
//! output (computed outside the graph), its backward recomputes and returns the input's
//! gradient, and puts the adapters' gradients into a side store that the train step merges.

use anyhow::Result;
use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor, TensorId, Var};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::decoder::{Context, DecoderLayer};
use super::lora::Pass;
use super::precomputed::Precomputed;

/// Adapter gradients by variable, filled during backward passes.
pub type SideGrads = Arc<Mutex<HashMap<TensorId, Tensor>>>;

/// Runs `layer` on `x` without keeping its activations; gradients arrive in the backward pass.
pub(crate) fn forward(
    layer: &DecoderLayer,
    x: &Tensor,
    ctx: &Context,
    grads: &SideGrads,
) -> Result<Tensor> {
    let mut untracked = ctx.clone();
    untracked.pass = Pass {
        track: false,
        ..ctx.pass
    };
    let y = layer.forward(&x.detach(), &untracked)?;
    // One of the layer's adapter variables joins the op so that it is recorded even when x is not
    // tracked (the first layer's input comes from the frozen embeddings).
    let Some(anchor) = adapters(layer).into_iter().next() else {
        return layer.forward(x, ctx);
    };
    let op = Checkpoint {
        layer: layer.clone(),
        ctx: ctx.clone(),
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

/// The adapter variables of a layer.
fn adapters(layer: &DecoderLayer) -> Vec<Var> {
    layer
        .projections()
        .into_iter()
        .filter_map(|(_, l)| l.lora.as_ref())
        .flat_map(|l| [l.a.clone(), l.b.clone()])
        .collect()
}

struct Checkpoint {
    layer: DecoderLayer,
    ctx: Context,
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
        let out = self
            .layer
            .forward(input.as_tensor(), &self.ctx)
            .map_err(|e| {
                candle_core::Error::Msg(format!("recomputing a checkpointed layer: {e:#}"))
            })?;
        let store = (out * grad.detach())?.sum_all()?.backward()?;
        let mut side = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradient store poisoned".into()))?;
        for var in adapters(&self.layer) {
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
