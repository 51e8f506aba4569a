//! The small layers every family is built from: linear maps, the three norms and the MLP
//! activations.

use tch::{Kind, Tensor};

use crate::config::{Activation, NormKind};
use crate::error::Result;
use crate::kernels;
use crate::packed::PackedWeight;
use crate::weights::ParamSource;

/// `y = x W^T + b`.
#[derive(Debug)]
pub(crate) struct Linear {
    /// `[out, in]` as checkpoints store it, or `[in, out]` when `in_out`.
    weight: Tensor,
    bias: Option<Tensor>,
    /// The weight is stored transposed (see [`Linear::store_in_out`]).
    in_out: bool,
    /// Its packed form for decoding on the CPU ([`Linear::store_in_out`]).
    packed: Option<Box<PackedWeight>>,
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
        Ok(Self {
            weight,
            bias,
            in_out: false,
            packed: None,
        })
    }

    /// A bias-free map from a weight `[out, in]` already read.
    pub(crate) fn from_weight(weight: Tensor) -> Self {
        Self {
            weight,
            bias: None,
            in_out: false,
            packed: None,
        }
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = match &self.packed {
            Some(p) => p.product(x)?,
            None => None,
        } {
            return Ok(match &self.bias {
                Some(b) => y.f_add(b)?,
                None => y,
            });
        }
        if !self.in_out {
            return Ok(x.f_linear(&self.weight, self.bias.as_ref())?);
        }
        let y = x.f_matmul(&self.weight)?;
        Ok(match &self.bias {
            Some(b) => y.f_add(b)?,
            None => y,
        })
    }

    /// Stores the weight as `[in, out]` (contiguous), so that `forward` is `x W` with `W`
    /// untransposed: on the CPU, MKL's products with few rows of `x` (decoding) run two to
    /// three times faster that way than against the transposed `[out, in]` matrix. The
    /// products are the same up to the order of the additions. With `pack`, decoding products
    /// take a packed copy of the weight ([`PackedWeight`], made on the first one), faster
    /// still.
    pub(crate) fn store_in_out(&mut self, pack: bool) -> Result<()> {
        if !self.in_out {
            self.weight = self.weight.f_tr()?.f_contiguous()?;
            self.in_out = true;
        }
        if pack {
            self.packed = Some(Box::new(PackedWeight::new(self.out_in())));
        }
        Ok(())
    }

    /// The weight as checkpoints store it, `[out, in]` (a view when stored `[in, out]`).
    fn out_in(&self) -> Tensor {
        if self.in_out {
            self.weight.tr()
        } else {
            self.weight.shallow_clone()
        }
    }

    /// Output features (rows of the checkpoint's weight).
    pub(crate) fn out_features(&self) -> i64 {
        self.out_in().size()[0]
    }

    /// One map computing `parts` side by side (their outputs concatenated, in order): one
    /// matrix product instead of several. The parts' biases must be all present or all absent.
    pub(crate) fn join(parts: &[&Linear]) -> Result<Self> {
        let weights: Vec<Tensor> = parts.iter().map(|l| l.out_in()).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|l| l.bias.as_ref()).collect();
        Ok(Self {
            weight: Tensor::f_cat(&weights, 0)?,
            bias: match biases {
                Some(b) => Some(Tensor::f_cat(&b, 0)?),
                None => None,
            },
            in_out: false,
            packed: None,
        })
    }

    pub(crate) fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        out.push((format!("{prefix}.weight"), self.out_in()));
        if let Some(b) = &self.bias {
            out.push((format!("{prefix}.bias"), b.shallow_clone()));
        }
    }

    /// The parameters of a [`Linear::join`]ed map under its parts' names: `(prefix, rows)` in
    /// order, each a view of the joined tensors.
    pub(crate) fn split_params(&self, parts: &[(String, i64)], out: &mut Vec<(String, Tensor)>) {
        let weight = self.out_in();
        let mut start = 0;
        for (prefix, rows) in parts {
            out.push((format!("{prefix}.weight"), weight.narrow(0, start, *rows)));
            if let Some(b) = &self.bias {
                out.push((format!("{prefix}.bias"), b.narrow(0, start, *rows)));
            }
            start += rows;
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
            NormKind::Rms if kernels::applies(x, &[&self.weight]) => {
                kernels::rms_norm(x, &self.weight, self.eps)?
            }
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
