//! AdamW with PyTorch's semantics (decoupled weight decay, bias correction, per-parameter step
//! counts, parameters without a gradient skipped) and global-norm clipping.

use anyhow::Result;
use candle_core::{Tensor, Var};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    /// PyTorch's betas and eps, without weight decay (as a recipe's `[train]` defaults).
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Optimizer state for a fixed list of variables.
pub struct AdamW {
    params: AdamWParams,
    vars: Vec<Var>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Updates each variable has received (torch keeps `state["step"]` per parameter).
    steps: Vec<i32>,
}

impl AdamW {
    pub fn new(vars: Vec<Var>, params: AdamWParams) -> Result<Self> {
        let m = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|v| v.zeros_like())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            params,
            steps: vec![0; vars.len()],
            vars,
            m,
            v,
        })
    }

    /// The first and second moments and the per-variable step counts, for a checkpoint.
    pub fn state(&self) -> (&[Tensor], &[Tensor], &[i32]) {
        (&self.m, &self.v, &self.steps)
    }

    /// Restores what [`Self::state`] returned (same variables, same order and shapes).
    pub fn restore(&mut self, m: Vec<Tensor>, v: Vec<Tensor>, steps: Vec<i32>) -> Result<()> {
        let n = self.vars.len();
        if m.len() != n || v.len() != n || steps.len() != n {
            anyhow::bail!(
                "the optimizer state holds {} moments for {n} trainable tensors",
                m.len()
            );
        }
        for ((var, m), v) in self.vars.iter().zip(&m).zip(&v) {
            if m.dims() != var.dims() || v.dims() != var.dims() {
                anyhow::bail!(
                    "an optimizer moment has shape {:?}, its tensor {:?}",
                    m.dims(),
                    var.dims()
                );
            }
        }
        (self.m, self.v, self.steps) = (m, v, steps);
        Ok(())
    }

    /// One update at learning rate `lr` with `grads` (same order as the variables). A variable whose
    /// gradient is None is left as it is, as torch.optim.AdamW skips a parameter whose `grad` is
    /// None: no weight decay, no moment update, and its step count (its bias correction) stays.
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        let p = self.params;
        for (i, var) in self.vars.iter().enumerate() {
            let Some(g) = &grads[i] else { continue };
            self.steps[i] += 1;
            let bc1 = 1.0 - p.beta1.powi(self.steps[i]);
            let bc2 = 1.0 - p.beta2.powi(self.steps[i]);
            let m = ((&self.m[i] * p.beta1)? + (g * (1.0 - p.beta1))?)?;
            let v = ((&self.v[i] * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * p.weight_decay))?;
            let denom = ((v.sqrt()? / bc2.sqrt())? + p.eps)?;
            let update = ((&m / denom)? * (lr / bc1))?;
            var.set(&(decayed - update)?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }
}

/// The global L2 norm of the gradients there are (0 when there are none, as PyTorch's).
pub fn global_norm(grads: &[Option<Tensor>]) -> Result<f64> {
    let mut sum = 0f64;
    for g in grads.iter().flatten() {
        sum += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Scales gradients so their global norm is at most `max_norm` (torch.nn.utils.clip_grad_norm_).
pub fn clip(grads: Vec<Option<Tensor>>, norm: f64, max_norm: f64) -> Result<Vec<Option<Tensor>>> {
    if max_norm <= 0.0 {
        return Ok(grads);
    }
    let coef = max_norm / (norm + 1e-6);
    if coef >= 1.0 {
        return Ok(grads);
    }
    Ok(grads
        .into_iter()
        .map(|g| g.map(|g| g * coef).transpose())
        .collect::<candle_core::Result<Vec<_>>>()?)
}
