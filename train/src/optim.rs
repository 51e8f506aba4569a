//! AdamW with its state held as named tensors (so checkpoints resume exactly), a warmup + cosine
//! learning-rate schedule, and global gradient-norm clipping.

use std::collections::HashMap;

use tch::{Kind, Tensor};

use crate::{Error, Result};

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, applied to matrices only (not to norms or biases).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        }
    }
}

/// AdamW over a fixed list of named parameters.
#[derive(Debug)]
pub struct AdamW {
    params: Vec<(String, Tensor)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: i64,
    config: AdamWConfig,
}

impl AdamW {
    /// An optimizer with zero moments for `params` (which must require gradients).
    pub fn new(params: Vec<(String, Tensor)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |p: &Tensor| -> Result<Tensor> { Ok(p.f_zeros_like()?.f_detach()?) };
        let m = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<Result<_>>()?;
        let v = params
            .iter()
            .map(|(_, p)| zeros(p))
            .collect::<Result<_>>()?;
        Ok(Self {
            params,
            m,
            v,
            steps: 0,
            config,
        })
    }

    /// The parameters, by name.
    pub fn params(&self) -> &[(String, Tensor)] {
        &self.params
    }

    /// Updates taken so far.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// Clears every gradient.
    pub fn zero_grad(&mut self) {
        for (_, p) in &mut self.params {
            p.zero_grad();
        }
    }

    /// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm
    /// before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let mut total = 0.0;
        for (_, p) in &self.params {
            let g = p.grad();
            if g.defined() {
                total += g.f_square()?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        let norm = total.sqrt();
        if norm > max_norm && norm.is_finite() {
            let scale = max_norm / (norm + 1e-6);
            for (_, p) in &mut self.params {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(scale)?;
                }
            }
        }
        Ok(norm)
    }

    /// One AdamW update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let c = self.config;
        let bias1 = 1.0 - c.beta1.powi(self.steps as i32);
        let bias2 = 1.0 - c.beta2.powi(self.steps as i32);
        for (((_, p), m), v) in self.params.iter_mut().zip(&mut self.m).zip(&mut self.v) {
            let g = p.grad();
            if !g.defined() {
                continue;
            }
            // PyTorch's single-tensor AdamW, in place: m = lerp(m, g, 1 - b1);
            // v = b2 v + (1 - b2) g^2; p -= lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps).
            if c.weight_decay > 0.0 && p.dim() >= 2 {
                let _ = p.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let _ = m.f_lerp_(&g, 1.0 - c.beta1)?;
            let _ = v
                .f_mul_scalar_(c.beta2)?
                .f_addcmul_(&g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
            let mut denom = v.f_sqrt()?;
            let _ = denom.f_div_scalar_(bias2.sqrt())?.f_add_scalar_(c.eps)?;
            let _ = p.f_addcdiv_(&m.f_mul_scalar(-lr / bias1)?, &denom)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`adamw.m.<param>`, `adamw.v.<param>`), for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let names = self.params.iter().map(|(n, _)| n);
        names
            .clone()
            .zip(&self.m)
            .map(|(n, t)| (format!("adamw.m.{n}"), t.shallow_clone()))
            .chain(
                names
                    .zip(&self.v)
                    .map(|(n, t)| (format!("adamw.v.{n}"), t.shallow_clone())),
            )
            .collect()
    }

    /// Restores moments saved by [`AdamW::state`] and the number of steps taken.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, steps: i64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for (i, (name, p)) in self.params.iter().enumerate() {
            for (kind, slot) in [("m", &mut self.m[i]), ("v", &mut self.v[i])] {
                let key = format!("adamw.{kind}.{name}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| Error::MissingOptimizerState { name: key.clone() })?;
                if t.size() != p.size() {
                    return Err(Error::OptimizerStateShape {
                        name: key,
                        expected: p.size(),
                        found: t.size(),
                    });
                }
                slot.f_copy_(t)?;
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// Linear warmup to `max_lr` over `warmup` steps, then cosine decay to `min_lr` at `total`.
pub fn cosine_lr(step: usize, total: usize, warmup: usize, max_lr: f64, min_lr: f64) -> f64 {
    if step < warmup {
        return max_lr * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    min_lr + 0.5 * (max_lr - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    #[test]
    fn schedule_warms_up_then_decays() {
        assert!((cosine_lr(0, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
        assert!((cosine_lr(9, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(10, 100, 10, 1.0, 0.1) - 1.0).abs() < 1e-12);
        assert!((cosine_lr(55, 100, 10, 1.0, 0.1) - 0.55).abs() < 1e-12);
        assert!((cosine_lr(100, 100, 10, 1.0, 0.1) - 0.1).abs() < 1e-12);
    }

    /// Hand-computed AdamW steps on f(p) = sum(p^2) / 2 (gradient p), checked against the
    /// closed form of the first update: p - lr * sign(g) (m^/sqrt(v^) = g/|g|) and decay.
    #[test]
    fn adamw_matches_the_update_rule() -> Result<()> {
        let p = Tensor::from_slice(&[1.0f32, -2.0, 3.0, -4.0])
            .reshape([2, 2])
            .set_requires_grad(true);
        let config = AdamWConfig {
            weight_decay: 0.5,
            eps: 0.0,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(vec![("w".into(), p.shallow_clone())], config)?;
        let loss = (&p * &p).sum(Kind::Float) / 2.0;
        loss.backward();
        opt.step(0.1)?;
        let got = Vec::<f32>::try_from(p.detach().flatten(0, -1))?;
        let want: Vec<f32> = [1.0f32, -2.0, 3.0, -4.0]
            .iter()
            .map(|&x| x * (1.0 - 0.1 * 0.5) - 0.1 * x.signum())
            .collect();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        assert_eq!(opt.steps(), 1);
        Ok(())
    }

    #[test]
    fn clipping_scales_to_the_max_norm() -> Result<()> {
        let p = Tensor::zeros([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
        let target = Tensor::from_slice(&[3.0f32, 4.0, 0.0]);
        let loss = (&p * &target).sum(Kind::Float); // gradient = target, norm 5
        loss.backward();
        let mut opt = AdamW::new(
            vec![("p".into(), p.shallow_clone())],
            AdamWConfig::default(),
        )?;
        let norm = opt.clip_grad_norm(1.0)?;
        assert!((norm - 5.0).abs() < 1e-9);
        let g = Vec::<f32>::try_from(p.grad())?;
        assert!(
            (g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5,
            "{g:?}"
        );
        Ok(())
    }
}
