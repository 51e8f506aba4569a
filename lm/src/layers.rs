//! The small layers every family is built from: linear maps, the three norms and the MLP
//! activations.

use tch::{Kind, Tensor};

use crate::config::{Activation, NormKind};
use crate::error::Result;
use crate::weights::ParamSource;

/// `y = x W^T + b`.
#[derive(Debug)]
pub(crate) struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    pub(crate) fn load(
        w: &dyn ParamSource,
        prefix: &str,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let weight = w.get(
            &format!("{prefix}.weight"),
            &[out_dim as i64, in_dim as i64],
        )?;
        let bias = if bias {
            Some(w.get(&format!("{prefix}.bias"), &[out_dim as i64])?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// A bias-free map from a weight `[out, in]` already read.
    pub(crate) fn from_weight(weight: Tensor) -> Self {
        Self { weight, bias: None }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_linear(&self.weight, self.bias.as_ref())?)
    }

    pub(crate) fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.shallow_clone()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.shallow_clone()));
        }
    }
}

/// A norm over the last dimension, as transformers computes each kind.
#[derive(Debug)]
pub(crate) struct Norm {
    kind: NormKind,
    weight: Tensor,
    /// LayerNorm only.
    bias: Option<Tensor>,
    eps: f64,
}

impl Norm {
    pub(crate) fn load(
        w: &dyn ParamSource,
        prefix: &str,
        dim: usize,
        kind: NormKind,
        eps: f64,
    ) -> Result<Self> {
        let bias = match kind {
            NormKind::LayerNorm => Some(w.get(&format!("{prefix}.bias"), &[dim as i64])?),
            NormKind::Rms | NormKind::RmsOnePlus => None,
        };
        Ok(Self {
            kind,
            weight: w.get(&format!("{prefix}.weight"), &[dim as i64])?,
            bias,
            eps,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let rms_normed = |x32: &Tensor| -> Result<Tensor> {
            let variance = x32.f_square()?.f_mean_dim(-1, true, Kind::Float)?;
            Ok(x32.f_mul(&variance.f_add_scalar(self.eps)?.f_rsqrt()?)?)
        };
        Ok(match self.kind {
            // Llama: the variance in float32, the weight applied in the input's dtype.
            NormKind::Rms => {
                let normed = rms_normed(&x.f_to_kind(Kind::Float)?)?;
                self.weight.f_mul(&normed.f_to_kind(kind)?)?
            }
            // Gemma: everything in float32, times (1 + w).
            NormKind::RmsOnePlus => {
                let normed = rms_normed(&x.f_to_kind(Kind::Float)?)?;
                let scale = self.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?;
                normed.f_mul(&scale)?.f_to_kind(kind)?
            }
            NormKind::LayerNorm => {
                let dim = x.size().last().copied().unwrap_or(0);
                x.f_layer_norm(
                    [dim],
                    Some(&self.weight),
                    self.bias.as_ref(),
                    self.eps,
                    false,
                )?
            }
        })
    }

    pub(crate) fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.weight.shallow_clone()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.shallow_clone()));
        }
    }
}

impl Activation {
    /// The activation applied elementwise.
    pub(crate) fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Self::Silu => x.f_silu()?,
            Self::Gelu => x.f_gelu("none")?,
            Self::GeluTanh => x.f_gelu("tanh")?,
        })
    }
}
