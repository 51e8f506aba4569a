//! Where dV/dh comes from: one trait, two implementations.
//!
//! - [`OnnxBackend`]: ONNX Runtime runs the exported `value_grad.onnx` (and `controller.onnx`,
//!   which does all the plain-SGD steps of a decoding step in one call), on its CUDA execution
//!   provider when the LM is on a GPU and the loaded onnxruntime has it, else on the CPU.
//! - [`TorchBackend`]: the value directory's weights in libtorch on the LM's device, with the
//!   value gradient in closed form (no autograd graph) and a decoding step's updates in one call.

use std::path::Path;

use recontrol_export::{
    build_model, ControllerSpec, GraphKind, GraphSession, OrtRuntime, Producer, ValueDir,
};
use recontrol_lm::DecodingProduct;
use recontrol_value_net::grad::HiddenProducts;
use recontrol_value_net::ValueModel;
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// V and dV/dh of a batch of states; optionally the whole SGD edit in one call.
pub trait GradientBackend {
    /// What runs where, e.g. `ONNX Runtime on cuda, controller.onnx fuses 30 steps`,
    /// `torch autograd on Cuda(0)`.
    fn describe(&self) -> String;

    /// `h [rows, d]` f32 -> (V `[rows]`, dV/dh `[rows, d]`), f32, on `h`'s device.
    fn value_grad(&mut self, h: &Tensor) -> Result<(Tensor, Tensor)>;

    /// `h [rows, d]` f32 -> V `[rows]`.
    fn value(&mut self, h: &Tensor) -> Result<Tensor>;

    /// `steps` plain SGD steps `h <- h + alpha dV/dh` (projected onto `max_edit_norm`) in one
    /// call, when the backend has them fused for exactly these settings: (edited, V before,
    /// V after). `None` when it does not; the editor then loops over [`Self::value_grad`].
    fn fused_sgd(
        &mut self,
        _h: &Tensor,
        _alpha: f64,
        _steps: usize,
        _max_edit_norm: Option<f64>,
    ) -> Option<Result<(Tensor, Tensor, Tensor)>> {
        None
    }
}

/// A value net in libtorch: closed-form V and dV/dh ([`ValueModel::value_and_grad`]).
#[derive(Debug)]
pub struct TorchBackend {
    model: ValueModel,
    device: Device,
    /// On the CPU, the gradient steps' products by recontrol-lm's decoding products: a
    /// 576 x 576 product of one to eight rows took libtorch (MKL's generic code on an AMD
    /// CPU) about as long as reading a matrix thirty times its size.
    products: Option<PackedValue>,
}

impl TorchBackend {
    /// Loads a value directory on `device`.
    pub fn load(value_dir: &Path, device: Device) -> Result<Self> {
        let model = ValueModel::load(value_dir, device)?;
        let products = match device {
            Device::Cpu => Some(PackedValue::new(&model)?),
            _ => None,
        };
        Ok(Self {
            model,
            device,
            products,
        })
    }
}

/// A value MLP's hidden products ([`HiddenProducts`]) by [`DecodingProduct`]s.
#[derive(Debug)]
struct PackedValue {
    /// Per hidden layer: `x W^T`, the bias, and `g W` (the product by `W^T`).
    layers: Vec<(DecodingProduct, Tensor, DecodingProduct)>,
}

impl PackedValue {
    fn new(model: &ValueModel) -> Result<Self> {
        let layers = model.mlp.layers();
        let layers = layers[..layers.len() - 1]
            .iter()
            .map(|(w, b)| -> Result<_> {
                let w = w.detach();
                let back = DecodingProduct::new(&w.f_tr()?.f_contiguous()?);
                Ok((DecodingProduct::new(&w), b.detach(), back))
            })
            .collect::<Result<_>>()?;
        Ok(Self { layers })
    }
}

fn lm_error(e: recontrol_lm::Error) -> tch::TchError {
    tch::TchError::Torch(e.to_string())
}

impl HiddenProducts for PackedValue {
    fn forward(&self, layer: usize, x: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
        let (product, bias, _) = &self.layers[layer];
        product.forward(x).map_err(lm_error)?.f_add(bias)
    }

    fn backward(&self, layer: usize, g: &Tensor) -> std::result::Result<Tensor, tch::TchError> {
        self.layers[layer].2.forward(g).map_err(lm_error)
    }
}

impl GradientBackend for TorchBackend {
    fn describe(&self) -> String {
        format!(
            "torch on {:?}, closed-form value gradient, the steps of a decoding step in one call",
            self.device
        )
    }

    fn value_grad(&mut self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok(self.model.value_and_grad(h)?)
    }

    fn value(&mut self, h: &Tensor) -> Result<Tensor> {
        Ok(tch::no_grad(|| self.model.value(h))?)
    }

    fn fused_sgd(
        &mut self,
        h: &Tensor,
        alpha: f64,
        steps: usize,
        max_edit_norm: Option<f64>,
    ) -> Option<Result<(Tensor, Tensor, Tensor)>> {
        let outcome = match &self.products {
            Some(products) => self
                .model
                .sgd_steps_with(h, alpha, steps, max_edit_norm, products),
            None => self.model.sgd_steps(h, alpha, steps, max_edit_norm),
        };
        Some(
            outcome
                .map(|o| (o.edited, o.before, o.after))
                .map_err(Into::into),
        )
    }
}

/// ONNX Runtime on the exported graphs.
#[derive(Debug)]
pub struct OnnxBackend {
    value_grad: GraphSession,
    /// `controller.onnx` with the settings it was exported with.
    controller: Option<(GraphSession, ControllerSpec)>,
    hidden_size: usize,
    /// The execution provider ONNX Runtime runs on (`cpu` or `cuda`).
    provider: &'static str,
}

impl OnnxBackend {
    /// Sessions for `value_grad.onnx` and, if given, `controller.onnx` (with the settings it
    /// was exported with); on CUDA device `cuda` when the loaded onnxruntime has the CUDA
    /// execution provider, else on the CPU.
    pub fn open(
        runtime: &OrtRuntime,
        value_grad: &Path,
        controller: Option<(&Path, ControllerSpec)>,
        hidden_size: usize,
        threads: Option<usize>,
        cuda: Option<usize>,
    ) -> Result<Self> {
        let controller = controller
            .map(|(path, spec)| {
                GraphSession::open_on(runtime, path, threads, cuda).map(|s| (s.0, spec))
            })
            .transpose()?;
        let (value_grad, provider) = GraphSession::open_on(runtime, value_grad, threads, cuda)?;
        Ok(Self {
            value_grad,
            controller,
            hidden_size,
            provider,
        })
    }

    /// A session of a value directory's `value_grad` graph, built in memory (no export
    /// written, no fused controller), placed as [`Self::open`] places one.
    pub fn from_value_dir(
        runtime: &OrtRuntime,
        value: &ValueDir,
        threads: Option<usize>,
        cuda: Option<usize>,
    ) -> Result<Self> {
        // The controller settings and producer only enter the graph's metadata.
        let model = build_model(
            GraphKind::ValueGrad,
            value,
            &ControllerSpec {
                steps: 0,
                alpha: 0.0,
                max_edit_norm: None,
            },
            &Producer {
                recontrol_version: env!("CARGO_PKG_VERSION").into(),
                git_revision: String::new(),
            },
        )?;
        let (value_grad, provider) =
            GraphSession::from_model_on(runtime, &model, &value.dir, threads, cuda)?;
        Ok(Self {
            value_grad,
            controller: None,
            hidden_size: value.config.input_dim,
            provider,
        })
    }

    fn host(&self, h: &Tensor) -> Result<(Vec<f32>, usize)> {
        let rows = h.size()[0] as usize;
        if h.size() != [rows as i64, self.hidden_size as i64] {
            return Err(Error::StateShape {
                shape: h.size(),
                hidden_size: self.hidden_size,
            });
        }
        let flat = h
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_contiguous()?
            .f_flatten(0, -1)?;
        Ok((Vec::<f32>::try_from(&flat)?, rows))
    }
}

fn to_device(values: &[f32], shape: &[i64], device: Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(values)
        .f_view(shape)?
        .f_to_device(device)?)
}

impl GradientBackend for OnnxBackend {
    fn describe(&self) -> String {
        let fused = match &self.controller {
            Some((_, spec)) => format!(", controller.onnx fuses {} steps", spec.steps),
            None => String::new(),
        };
        format!("ONNX Runtime on {}{fused}", self.provider)
    }

    fn value_grad(&mut self, h: &Tensor) -> Result<(Tensor, Tensor)> {
        let (host, rows) = self.host(h)?;
        let (v, g) = self.value_grad.value_grad(&host, rows)?;
        let device = h.device();
        Ok((
            to_device(&v, &[rows as i64], device)?,
            to_device(&g, &h.size(), device)?,
        ))
    }

    fn value(&mut self, h: &Tensor) -> Result<Tensor> {
        let (host, rows) = self.host(h)?;
        let v = self.value_grad.value_grad(&host, rows)?.0;
        to_device(&v, &[rows as i64], h.device())
    }

    fn fused_sgd(
        &mut self,
        h: &Tensor,
        alpha: f64,
        steps: usize,
        max_edit_norm: Option<f64>,
    ) -> Option<Result<(Tensor, Tensor, Tensor)>> {
        let (_, spec) = self.controller.as_ref()?;
        if spec.steps != steps || spec.max_edit_norm != max_edit_norm.map(|x| x as f32) {
            return None;
        }
        let (host, rows) = match self.host(h) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        };
        let (session, _) = self.controller.as_mut()?;
        let mut run = || -> Result<(Tensor, Tensor, Tensor)> {
            let c = session.control(&host, rows, alpha as f32)?;
            let device = h.device();
            Ok((
                to_device(&c.edited, &h.size(), device)?,
                to_device(&c.value_before, &[rows as i64], device)?,
                to_device(&c.value_after, &[rows as i64], device)?,
            ))
        };
        Some(run())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use recontrol_value_net::{Activation, ValueConfig, ValueMlp};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let diff = f64::try_from((a - b).abs().max()).expect("scalar");
        diff / f64::try_from(b.abs().max()).expect("scalar").max(1e-12)
    }

    /// The CPU backend's steps by recontrol-lm's decoding products against the value net's
    /// own (libtorch's `linear` and `matmul`), for one and two hidden layers, 1 to 8 rows,
    /// with and without the edit bound.
    #[test]
    fn decoding_products_give_libtorchs_steps() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (case, (activation, hidden)) in [
            (Activation::Tanh, vec![96]),
            (Activation::Relu, vec![96, 64]),
        ]
        .into_iter()
        .enumerate()
        {
            let input = 64;
            let seed = case as u64 + 1;
            let model = ValueModel {
                mlp: ValueMlp::new(input, &hidden, activation, seed, Device::Cpu).expect("mlp"),
                config: ValueConfig {
                    input_dim: input,
                    hidden_dims: hidden.clone(),
                    activation,
                    reward_mean: 0.5,
                    reward_std: 4.0,
                    lm_hidden_size: input,
                    lm_identity: "test".into(),
                    target: None,
                    training: serde_json::json!({}),
                    seed,
                    git_revision: "test".into(),
                    recontrol_version: "test".into(),
                },
            };
            let path = dir.path().join(format!("v{case}"));
            model.save(&path).expect("save");
            let mut backend = TorchBackend::load(&path, Device::Cpu).expect("load");
            assert!(
                backend.products.is_some(),
                "the CPU takes the decoding products"
            );
            for rows in [1, 3, 8] {
                tch::manual_seed(rows);
                let h = Tensor::randn([rows, input as i64], (Kind::Float, Device::Cpu));
                for bound in [None, Some(0.05)] {
                    let (edited, before, after) = backend
                        .fused_sgd(&h, 0.02, 30, bound)
                        .expect("fused")
                        .expect("steps");
                    let want = model.sgd_steps(&h, 0.02, 30, bound).expect("steps");
                    let label = format!("{activation:?} {hidden:?} rows {rows} bound {bound:?}");
                    assert!(max_rel(&edited, &want.edited) < 1e-5, "{label}: edited");
                    assert!(max_rel(&before, &want.before) < 1e-5, "{label}: before");
                    assert!(max_rel(&after, &want.after) < 1e-5, "{label}: after");
                    assert!(max_rel(&edited, &h) > 1e-4, "{label}: the steps moved h");
                }
            }
        }
    }
}
