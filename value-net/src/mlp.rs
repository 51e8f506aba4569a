//! The value MLP: `hidden -> hidden_dims... -> 1`, an activation between layers, weights named
//! like PyTorch `nn.Linear` layers (`layers.{i}.weight` `[out, in]`, `layers.{i}.bias`), and a
//! reward normalisation so that values come back in reward units.

use std::collections::HashMap;
use std::path::PathBuf;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// The nonlinearity between layers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    Relu,
    Tanh,
    /// The exact (erf) GELU, PyTorch's default.
    Gelu,
    Silu,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        match self {
            Self::Relu => x.f_relu(),
            Self::Tanh => x.f_tanh(),
            Self::Gelu => x.f_gelu("none"),
            Self::Silu => x.f_silu(),
        }
    }
}

/// `config.json` of a value directory: the architecture, the reward normalisation, and where
/// the net comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueConfig {
    pub input_dim: usize,
    pub hidden_dims: Vec<usize>,
    pub activation: Activation,
    /// V in reward units = raw output * reward_std + reward_mean.
    pub reward_mean: f64,
    pub reward_std: f64,
    /// The source LM's hidden size and identity (`sha256:...` of its config, tokenizer and
    /// checkpoint headers).
    pub lm_hidden_size: usize,
    pub lm_identity: String,
    pub training: serde_json::Value,
    pub seed: u64,
    pub git_revision: String,
    pub recontrol_version: String,
}

/// A value MLP.
#[derive(Debug)]
pub struct ValueMlp {
    /// `(weight [out, in], bias [out])` per layer.
    layers: Vec<(Tensor, Tensor)>,
    activation: Activation,
}

impl ValueMlp {
    /// A freshly initialised net (PyTorch's `nn.Linear` init, U(-1/sqrt(in), 1/sqrt(in)) for
    /// weights and biases, from a seeded RNG), trainable.
    pub fn new(
        input_dim: usize,
        hidden_dims: &[usize],
        activation: Activation,
        seed: u64,
        device: Device,
    ) -> Result<Self> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut dims = vec![input_dim];
        dims.extend_from_slice(hidden_dims);
        dims.push(1);
        let mut layers = Vec::with_capacity(dims.len() - 1);
        for w in dims.windows(2) {
            let (fan_in, fan_out) = (w[0], w[1]);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let mut draw = |n: usize| -> Result<Tensor> {
                let values: Vec<f32> = (0..n)
                    .map(|_| rng.random_range(-bound..bound) as f32)
                    .collect();
                Ok(Tensor::from_slice(&values).f_to_device(device)?)
            };
            let weight = draw(fan_in * fan_out)?.f_view([fan_out as i64, fan_in as i64])?;
            let bias = draw(fan_out)?;
            layers.push((weight.set_requires_grad(true), bias.set_requires_grad(true)));
        }
        Ok(Self { layers, activation })
    }

    /// A net from tensors named `layers.{i}.weight` / `layers.{i}.bias`, checked to chain
    /// (each layer's input is the previous one's output; the last has one output).
    pub fn from_named(
        tensors: &HashMap<String, Tensor>,
        activation: Activation,
        requires_grad: bool,
    ) -> Result<Self> {
        let invalid = |message: String| Error::Invalid {
            path: PathBuf::from("value weights"),
            message,
        };
        let mut layers = Vec::new();
        while let Some(weight) = tensors.get(&format!("layers.{}.weight", layers.len())) {
            let i = layers.len();
            let bias = tensors
                .get(&format!("layers.{i}.bias"))
                .ok_or_else(|| invalid(format!("layers.{i}.bias is missing")))?;
            let shape = weight.size();
            if shape.len() != 2 || bias.size() != [shape[0]] {
                return Err(invalid(format!(
                    "layers.{i}: weight {shape:?} and bias {:?} do not form a linear layer",
                    bias.size()
                )));
            }
            if let Some((prev, _)) = layers.last() {
                let prev: &Tensor = prev;
                if prev.size()[0] != shape[1] {
                    return Err(invalid(format!(
                        "layers.{i} takes {} inputs but layers.{} gives {}",
                        shape[1],
                        i - 1,
                        prev.size()[0]
                    )));
                }
            }
            let prepare = |t: &Tensor| -> Result<Tensor> {
                let t = t.f_detach_copy()?;
                Ok(if requires_grad {
                    t.set_requires_grad(true)
                } else {
                    t
                })
            };
            layers.push((prepare(weight)?, prepare(bias)?));
        }
        match layers.last() {
            None => Err(invalid("no layers.0.weight".into())),
            Some((w, _)) if w.size()[0] != 1 => Err(invalid(format!(
                "the last layer has {} outputs; a value net has one",
                w.size()[0]
            ))),
            Some(_) => Ok(Self { layers, activation }),
        }
    }

    /// Input width.
    pub fn input_dim(&self) -> usize {
        self.layers.first().map_or(0, |(w, _)| w.size()[1] as usize)
    }

    /// `[batch, input]` -> `[batch]`, in normalised reward units.
    pub fn forward_raw(&self, x: &Tensor) -> Result<Tensor, tch::TchError> {
        let mut x = x.shallow_clone();
        let last = self.layers.len() - 1;
        for (i, (w, b)) in self.layers.iter().enumerate() {
            x = x.f_linear(w, Some(b))?;
            if i < last {
                x = self.activation.apply(&x)?;
            }
        }
        x.f_squeeze_dim(-1)
    }

    /// The weights by PyTorch name, sharing storage.
    pub fn named_params(&self) -> Vec<(String, Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, (w, b))| {
                [
                    (format!("layers.{i}.weight"), w.shallow_clone()),
                    (format!("layers.{i}.bias"), b.shallow_clone()),
                ]
            })
            .collect()
    }

    /// The kind of the weights.
    pub fn kind(&self) -> Kind {
        self.layers.first().map_or(Kind::Float, |(w, _)| w.kind())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::golden;

    #[test]
    fn forward_matches_pytorch_for_every_activation() -> Result<()> {
        let g = golden();
        for (act, name) in [
            (Activation::Relu, "relu"),
            (Activation::Tanh, "tanh"),
            (Activation::Gelu, "gelu"),
            (Activation::Silu, "silu"),
        ] {
            let mlp = ValueMlp::from_named(&g, act, false)?;
            let y = mlp.forward_raw(&g["x"])?;
            let diff = (y - &g[&format!("y.{name}")])
                .abs()
                .max()
                .f_double_value(&[])?;
            assert!(diff < 1e-12, "{name}: {diff}");
        }
        Ok(())
    }

    #[test]
    fn shapes_are_checked() {
        let mut g = golden();
        g.insert(
            "layers.1.weight".into(),
            Tensor::zeros([4, 3], (Kind::Double, Device::Cpu)),
        );
        let err = ValueMlp::from_named(&g, Activation::Relu, false)
            .expect_err("bad chain")
            .to_string();
        assert!(
            err.contains("layers.1 takes 3 inputs but layers.0 gives 5"),
            "{err}"
        );
    }

    #[test]
    fn init_is_seeded_and_in_pytorch_bounds() -> Result<()> {
        let a = ValueMlp::new(16, &[8], Activation::Relu, 3, Device::Cpu)?;
        let b = ValueMlp::new(16, &[8], Activation::Relu, 3, Device::Cpu)?;
        let c = ValueMlp::new(16, &[8], Activation::Relu, 4, Device::Cpu)?;
        let flat = |m: &ValueMlp| -> Vec<f32> {
            m.named_params()
                .iter()
                .flat_map(|(_, t)| {
                    Vec::<f32>::try_from(t.detach().flatten(0, -1)).unwrap_or_default()
                })
                .collect()
        };
        assert_eq!(flat(&a), flat(&b));
        assert_ne!(flat(&a), flat(&c));
        let w0 = a.named_params()[0].1.abs().max().f_double_value(&[])?;
        assert!(w0 <= 0.25 && w0 > 0.1, "{w0}");
        assert_eq!(a.input_dim(), 16);
        Ok(())
    }
}
