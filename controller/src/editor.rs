//! The hidden-state editor: at every decoding step, `steps` updates of the final post-norm
//! state of each unfinished row up the value's gradient, before the logits are computed.

use recontrol_lm::{HiddenStateHook, HookContext, HookError};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::backend::GradientBackend;
use crate::{Error, Result};

/// The update rule of one step.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpdateRule {
    /// `h <- h + alpha * dV/dh` (the paper; the reference code's SGD on -V(h).sum()).
    Sgd,
    /// Adam ascent on V with step size alpha, fresh moments at every decoding step.
    Adam,
}

/// How states are edited.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ControlConfig {
    pub alpha: f64,
    pub steps: usize,
    pub rule: UpdateRule,
    /// Clip each row's gradient to this L2 norm before the update.
    pub clip_grad_norm: Option<f64>,
    /// Project each row's total edit `||h' - h||_2` onto this bound after every step.
    pub max_edit_norm: Option<f64>,
}

impl ControlConfig {
    /// Refuses settings that cannot be right (non-finite alpha, non-positive bounds).
    pub fn check(&self) -> Result<()> {
        if !self.alpha.is_finite() {
            return Err(Error::AlphaNotFinite { alpha: self.alpha });
        }
        for (setting, bound) in [
            ("the gradient clip", self.clip_grad_norm),
            ("the edit-norm bound", self.max_edit_norm),
        ] {
            if let Some(value) = bound.filter(|v| !(v.is_finite() && *v > 0.0)) {
                return Err(Error::NotPositive { setting, value });
            }
        }
        Ok(())
    }
}

/// Per-row statistics of the edits, over the steps a row was edited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct RowStats {
    /// Decoding steps edited.
    pub edits: usize,
    pub edit_norm_sum: f64,
    pub edit_norm_max: f64,
    pub value_before_sum: f64,
    pub value_after_sum: f64,
}

impl RowStats {
    pub fn edit_norm_mean(&self) -> f64 {
        self.edit_norm_sum / self.edits.max(1) as f64
    }
    pub fn value_before_mean(&self) -> f64 {
        self.value_before_sum / self.edits.max(1) as f64
    }
    pub fn value_after_mean(&self) -> f64 {
        self.value_after_sum / self.edits.max(1) as f64
    }
}

/// Edits the states of a generation call; [`Controller::take_stats`] gives each row's stats.
pub struct Controller<'b> {
    backend: &'b mut dyn GradientBackend,
    config: ControlConfig,
    stats: Vec<RowStats>,
}

impl std::fmt::Debug for Controller<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("backend", &self.backend.describe())
            .field("config", &self.config)
            .finish()
    }
}

impl<'b> Controller<'b> {
    pub fn new(backend: &'b mut dyn GradientBackend, config: ControlConfig) -> Result<Self> {
        config.check()?;
        Ok(Self {
            backend,
            config,
            stats: Vec::new(),
        })
    }

    /// The statistics of each batch row so far, and a fresh start for the next call.
    pub fn take_stats(&mut self) -> Vec<RowStats> {
        std::mem::take(&mut self.stats)
    }

    /// Edits `h [rows, d]` (any float kind, any device): (edited, V before, V after), the
    /// edited states in `h`'s kind.
    pub fn edit(&mut self, h: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = self.config;
        let h0 = h.f_to_kind(Kind::Float)?;
        let fused = if c.rule == UpdateRule::Sgd && c.clip_grad_norm.is_none() {
            self.backend
                .fused_sgd(&h0, c.alpha, c.steps, c.max_edit_norm)
        } else {
            None
        };
        let (edited, before, after) = match fused {
            Some(result) => result?,
            None => self.step_loop(&h0)?,
        };
        Ok((edited.f_to_kind(h.kind())?, before, after))
    }

    fn step_loop(&mut self, h0: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let c = self.config;
        let _guard = tch::no_grad_guard();
        let mut h = h0.shallow_clone();
        let mut before = None;
        let (mut m, mut v) = (h0.f_zeros_like()?, h0.f_zeros_like()?);
        let (beta1, beta2, eps) = (0.9f64, 0.999f64, 1e-8);
        for step in 0..c.steps {
            let (value, mut grad) = self.backend.value_grad(&h)?;
            if before.is_none() {
                before = Some(value);
            }
            if let Some(max) = c.clip_grad_norm {
                grad = grad.f_mul(&shrink_to(&grad, max, 1e-12)?)?;
            }
            let update = match c.rule {
                UpdateRule::Sgd => grad.f_mul_scalar(c.alpha)?,
                UpdateRule::Adam => {
                    let t = (step + 1) as i32;
                    m = m
                        .f_mul_scalar(beta1)?
                        .f_add(&grad.f_mul_scalar(1.0 - beta1)?)?;
                    v = v
                        .f_mul_scalar(beta2)?
                        .f_add(&grad.f_square()?.f_mul_scalar(1.0 - beta2)?)?;
                    let m_hat = m.f_div_scalar(1.0 - beta1.powi(t))?;
                    let v_hat = v.f_div_scalar(1.0 - beta2.powi(t))?;
                    m_hat
                        .f_div(&v_hat.f_sqrt()?.f_add_scalar(eps)?)?
                        .f_mul_scalar(c.alpha)?
                }
            };
            h = h.f_add(&update)?;
            if let Some(bound) = c.max_edit_norm {
                let u = h.f_sub(h0)?;
                h = h0.f_add(&u.f_mul(&shrink_to(&u, bound, f64::from(f32::MIN_POSITIVE))?)?)?;
            }
        }
        let after = self.backend.value(&h)?;
        let before = match before {
            Some(b) => b,
            None => after.shallow_clone(),
        };
        Ok((h, before, after))
    }
}

/// Per row of `x [rows, d]`, the factor `min(1, max / ||x||_2)` (`[rows, 1]`) that brings the
/// row's L2 norm down to `max`; norms below `floor` count as `floor`.
fn shrink_to(x: &Tensor, max: f64, floor: f64) -> Result<Tensor, tch::TchError> {
    x.f_norm_scalaropt_dim(2, [1i64].as_slice(), true)?
        .f_clamp_min(floor)?
        .f_reciprocal()?
        .f_mul_scalar(max)?
        .f_clamp_max(1.0)
}

impl HiddenStateHook for Controller<'_> {
    fn apply(&mut self, ctx: &HookContext<'_>, hidden: Tensor) -> Result<Tensor, HookError> {
        let (edited, before, after) = self.edit(&hidden)?;
        let norms = Vec::<f64>::try_from(
            edited
                .f_to_kind(Kind::Float)?
                .f_sub(&hidden.f_to_kind(Kind::Float)?)?
                .f_norm_scalaropt_dim(2, [1i64].as_slice(), false)?
                .f_to_kind(Kind::Double)?
                .f_to_device(tch::Device::Cpu)?,
        )?;
        let host = |t: &Tensor| -> Result<Vec<f64>, tch::TchError> {
            Vec::<f64>::try_from(t.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)
        };
        let (before, after) = (host(&before)?, host(&after)?);
        for (k, &row) in ctx.rows.iter().enumerate() {
            if self.stats.len() <= row {
                self.stats.resize(row + 1, RowStats::default());
            }
            let s = &mut self.stats[row];
            s.edits += 1;
            s.edit_norm_sum += norms[k];
            s.edit_norm_max = s.edit_norm_max.max(norms[k]);
            s.value_before_sum += before[k];
            s.value_after_sum += after[k];
        }
        Ok(edited)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::{BackendKind, ValueArtifact};
    use recontrol_value_net::{Activation, ValueConfig, ValueMlp, ValueModel};
    use tch::Device;

    const D: usize = 6;

    /// A linear value V(h) = std * (w . h + b) + mean, whose gradient is `std * w` everywhere.
    fn linear_value(dir: &std::path::Path) -> Vec<f32> {
        let mlp = ValueMlp::new(D, &[], Activation::Relu, 5, Device::Cpu).expect("mlp");
        let w =
            Vec::<f32>::try_from(mlp.named_params()[0].1.detach().flatten(0, -1)).expect("weights");
        ValueModel {
            config: ValueConfig {
                input_dim: D,
                hidden_dims: vec![],
                activation: Activation::Relu,
                reward_mean: 1.0,
                reward_std: 2.0,
                lm_hidden_size: D,
                lm_identity: "sha256:test".into(),
                target: None,
                training: serde_json::json!({}),
                seed: 5,
                git_revision: "test".into(),
                recontrol_version: "test".into(),
            },
            mlp,
        }
        .save(dir)
        .expect("save");
        w.iter().map(|x| x * 2.0).collect()
    }

    fn edit(backend: &mut dyn GradientBackend, config: ControlConfig, h: &Tensor) -> Vec<f32> {
        let mut c = Controller::new(backend, config).expect("controller");
        let (edited, before, after) = c.edit(h).expect("edit");
        let (b, a) = (
            Vec::<f32>::try_from(&before).expect("before"),
            Vec::<f32>::try_from(&after).expect("after"),
        );
        assert!(
            a.iter().zip(&b).all(|(a, b)| a > b),
            "V rises: {b:?} -> {a:?}"
        );
        Vec::<f32>::try_from((edited - h).flatten(0, -1)).expect("edit")
    }

    /// With a linear V the edit has a closed form for every rule: SGD moves each row by
    /// `steps * alpha * grad`, a clip scales the gradient to the clip norm, a bound stops the
    /// edit at the bound along the gradient, Adam moves `steps * alpha * sign(grad)`.
    #[test]
    fn edits_of_a_linear_value_have_their_closed_forms() {
        let dir = tempfile::tempdir().expect("tempdir");
        let value = dir.path().join("v");
        let grad = linear_value(&value);
        let norm = grad.iter().map(|g| g * g).sum::<f32>().sqrt();
        let artifact = ValueArtifact::open(&value).expect("open");
        let h = Tensor::randn([3, D as i64], (Kind::Float, Device::Cpu));
        let sgd = ControlConfig {
            alpha: 0.1,
            steps: 7,
            rule: UpdateRule::Sgd,
            clip_grad_norm: None,
            max_edit_norm: None,
        };
        let cases: Vec<(ControlConfig, Vec<f32>)> = vec![
            (sgd, grad.iter().map(|g| 0.7 * g).collect()),
            (
                ControlConfig {
                    clip_grad_norm: Some(0.5 * f64::from(norm)),
                    ..sgd
                },
                grad.iter().map(|g| 0.35 * g).collect(),
            ),
            (
                ControlConfig {
                    max_edit_norm: Some(0.1),
                    ..sgd
                },
                grad.iter().map(|g| 0.1 * g / norm).collect(),
            ),
            (
                ControlConfig {
                    rule: UpdateRule::Adam,
                    ..sgd
                },
                grad.iter().map(|g| 0.7 * g.signum()).collect(),
            ),
        ];
        for kind in [BackendKind::Torch, BackendKind::Onnx] {
            let mut backend = artifact
                .backend(kind, Device::Cpu, None, Some(1))
                .expect("backend");
            for (config, want) in &cases {
                let got = edit(backend.as_mut(), *config, &h);
                for (row, chunk) in got.chunks(D).enumerate() {
                    for (g, w) in chunk.iter().zip(want) {
                        assert!(
                            (g - w).abs() < 1e-5 * (1.0 + w.abs()),
                            "{kind:?} {config:?} row {row}: {chunk:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn control_settings_that_cannot_be_right_are_named() {
        let ok = ControlConfig {
            alpha: 0.5,
            steps: 3,
            rule: UpdateRule::Sgd,
            clip_grad_norm: Some(1.0),
            max_edit_norm: Some(1.0),
        };
        assert!(ok.check().is_ok());
        let err = |c: ControlConfig| c.check().expect_err("bad").to_string();
        assert_eq!(
            err(ControlConfig {
                alpha: f64::NAN,
                ..ok
            }),
            "alpha must be finite, got NaN"
        );
        assert_eq!(
            err(ControlConfig {
                clip_grad_norm: Some(0.0),
                ..ok
            }),
            "the gradient clip must be positive and finite, got 0"
        );
        assert_eq!(
            err(ControlConfig {
                max_edit_norm: Some(-2.0),
                ..ok
            }),
            "the edit-norm bound must be positive and finite, got -2"
        );
    }
}
