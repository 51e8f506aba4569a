//! The value MLP: `hidden -> hidden_dims... -> 1`, an activation between layers, weights named
//! like PyTorch `nn.Linear` layers (`layers.{i}.weight` `[out, in]`, `layers.{i}.bias`), and a
//! reward normalisation so that values come back in reward units.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
pub use recontrol_export::value_dir::{Activation, ValueConfig};
use recontrol_export::ValueDir;
use recontrol_io::AtomicDir;
use recontrol_train::write_safetensors;
use tch::{Device, Kind, Tensor};

use crate::grad::{HiddenProducts, TorchProducts};
use crate::{Error, Result};

/// PyTorch's form of each activation.
pub(crate) fn activate(activation: Activation, x: &Tensor) -> Result<Tensor, tch::TchError> {
    match activation {
        Activation::Relu => x.f_relu(),
        Activation::Tanh => x.f_tanh(),
        Activation::Gelu => x.f_gelu("none"),
        Activation::Silu => x.f_silu(),
    }
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

    /// `(weight [out, in], bias [out])` per layer.
    pub fn layers(&self) -> &[(Tensor, Tensor)] {
        &self.layers
    }

    /// The activation between layers.
    pub fn activation(&self) -> Activation {
        self.activation
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
                x = activate(self.activation, &x)?;
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

/// A value net with its configuration: V in reward units.
#[derive(Debug)]
pub struct ValueModel {
    pub mlp: ValueMlp,
    pub config: ValueConfig,
}

impl ValueModel {
    /// `[batch, input]` -> V `[batch]` in reward units.
    pub fn value(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.value_in_units(x, &TorchProducts(self))?)
    }

    /// [`ValueModel::value`] with the hidden layers' products by `products` and libtorch's
    /// error, for the closed-form gradient's callers.
    pub(crate) fn value_in_units(
        &self,
        x: &Tensor,
        products: &dyn HiddenProducts,
    ) -> Result<Tensor, tch::TchError> {
        let layers = self.mlp.layers();
        let last = layers.len() - 1;
        let mut a = x.shallow_clone();
        for i in 0..last {
            a = activate(self.mlp.activation(), &products.forward(i, &a)?)?;
        }
        let (w, b) = &layers[last];
        a.f_linear(w, Some(b))?
            .f_squeeze_dim(-1)?
            .f_mul_scalar(self.config.reward_std)?
            .f_add_scalar(self.config.reward_mean)
    }

    /// Writes `config.json` and `model.safetensors` (float32) into the new folder `dir`, which
    /// appears only when complete.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let out = AtomicDir::create(dir)?;
        let config_path = out.path().join("config.json");
        let config = serde_json::to_string_pretty(&self.config).map_err(|e| Error::Invalid {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&config_path, config).map_err(|source| Error::Io {
            path: config_path,
            source,
        })?;
        write_safetensors(
            &out.path().join("model.safetensors"),
            &self.mlp.named_params(),
            None,
        )?;
        Ok(out.commit()?)
    }

    /// Reads a value directory, checked by [`ValueDir::read`] (the format's one reader):
    /// layers that chain as the config says, finite weights, a usable normalisation.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let checked = ValueDir::read(dir)?;
        let mut tensors = HashMap::new();
        for (i, layer) in checked.layers.iter().enumerate() {
            let (out, inp) = layer.weight.dim();
            let weight: Vec<f32> = layer.weight.iter().copied().collect();
            tensors.insert(
                format!("layers.{i}.weight"),
                Tensor::from_slice(&weight)
                    .f_view([out as i64, inp as i64])?
                    .f_to_device(device)?,
            );
            tensors.insert(
                format!("layers.{i}.bias"),
                Tensor::from_slice(&layer.bias.to_vec()).f_to_device(device)?,
            );
        }
        let mlp = ValueMlp::from_named(&tensors, checked.config.activation, false)?;
        Ok(Self {
            mlp,
            config: checked.config,
        })
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

    fn config(mlp: &ValueMlp) -> ValueConfig {
        ValueConfig {
            input_dim: mlp.input_dim(),
            hidden_dims: vec![5, 4],
            activation: Activation::Tanh,
            reward_mean: 2.0,
            reward_std: 3.0,
            lm_hidden_size: 6,
            lm_identity: "sha256:test".into(),
            target: None,
            training: serde_json::json!({}),
            seed: 1,
            git_revision: "test".into(),
            recontrol_version: "test".into(),
        }
    }

    #[test]
    fn value_dirs_round_trip_and_bad_ones_are_named() -> Result<()> {
        let g = golden();
        let mlp = ValueMlp::from_named(&g, Activation::Tanh, false)?;
        let model = ValueModel {
            config: config(&mlp),
            mlp,
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("value");
        model.save(&out)?;
        let back = ValueModel::load(&out, Device::Cpu)?;
        let x = g["x"].to_kind(Kind::Float);
        let want = g["y.tanh"].to_kind(Kind::Float) * 3.0 + 2.0;
        let diff = (back.value(&x)? - want).abs().max().f_double_value(&[])?;
        assert!(diff < 1e-5, "{diff}");
        assert_eq!(back.config, model.config);

        // A config that disagrees with the weights, and non-finite weights, are refused.
        let mut bad = model.config.clone();
        bad.hidden_dims = vec![5, 3];
        std::fs::write(
            out.join("config.json"),
            serde_json::to_string(&bad).expect("json"),
        )
        .expect("write");
        let err = ValueModel::load(&out, Device::Cpu)
            .expect_err("mismatch")
            .to_string();
        assert!(
            err.contains(
                "layers.1.weight has shape [4, 5]; config.json ([6, 5, 3, 1]) implies [3, 5]"
            ),
            "{err}"
        );
        let mut named = model.mlp.named_params();
        named[0].1 = named[0].1.full_like(f64::NAN);
        let nan_dir = dir.path().join("nan");
        let nan = ValueModel {
            mlp: ValueMlp::from_named(&named.into_iter().collect(), Activation::Tanh, false)?,
            config: model.config.clone(),
        };
        nan.save(&nan_dir)?;
        let err = ValueModel::load(&nan_dir, Device::Cpu)
            .expect_err("nan")
            .to_string();
        assert!(
            err.contains("layers.0.weight has a non-finite value (NaN at 0)"),
            "{err}"
        );
        Ok(())
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
