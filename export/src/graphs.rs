//! The three graphs of a value head, written as plain ONNX ops:
//!
//! - `value.onnx`: `hidden [batch, d] -> value [batch]` (reward units).
//! - `value_grad.onnx`: `hidden -> (value, grad)`, `grad = dV/dhidden [batch, d]`, the backward
//!   pass written out (Linear layers and each activation's derivative; no weight gradients).
//! - `controller.onnx`: `(hidden, alpha) -> (edited_hidden, value_before, value_after)`, `steps`
//!   unrolled iterations of `h <- h + alpha * dV/dh` (RE-Control's `SGD(lr = alpha)` on
//!   `-V(h).sum()`), optionally projecting the total edit `h - hidden` of each row onto an L2
//!   ball after every step.

use serde::{Deserialize, Serialize, Serializer};

use crate::graph::{Attr, Dim, GraphBuilder};
use crate::value_dir::{Activation, ValueDir};

/// Controller settings fixed at export (recorded in the graphs' metadata and the manifest).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ControllerSpec {
    /// Gradient steps per decoding step.
    pub steps: usize,
    /// The default step size (recorded in metadata; `alpha` is a graph input).
    #[serde(serialize_with = "widened")]
    pub alpha: f32,
    /// Bound on each row's total edit norm `||h_n - h_0||_2`, if any.
    #[serde(serialize_with = "widened_option")]
    pub max_edit_norm: Option<f32>,
}

/// Manifests have always held these f32 settings as f64 (`0.1` is written
/// `0.10000000149011612`); they read back as the same f32.
fn widened<S: Serializer>(x: &f32, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(f64::from(*x))
}

fn widened_option<S: Serializer>(x: &Option<f32>, s: S) -> Result<S::Ok, S::Error> {
    match x {
        Some(x) => s.serialize_some(&f64::from(*x)),
        None => s.serialize_none(),
    }
}

/// One Linear layer's initializers.
struct Layer {
    weight: String,
    bias: String,
}

/// The value net as graph constants.
struct Net {
    layers: Vec<Layer>,
    activation: Activation,
    /// `reward_std * W_last`, `[1, h]`: dV/da of the last hidden activation (or of the input).
    grad_row: String,
    std: String,
    mean: String,
    squeeze_axes: String,
    zero: String,
    one: String,
    half: String,
    inv_sqrt2: String,
    inv_sqrt_2pi: String,
}

/// What the backward pass needs of one hidden layer's forward pass.
struct Saved {
    /// Pre-activation `[batch, h]`.
    z: String,
    /// `tanh(z)`, `sigmoid(z)` or the normal CDF of `z`, by activation (ReLU: unused).
    aux: String,
}

impl Net {
    fn new(g: &mut GraphBuilder, v: &ValueDir) -> Self {
        let layers = v
            .layers
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (out, inp) = l.weight.dim();
                Layer {
                    weight: g.constant(
                        &format!("layers.{i}.weight"),
                        &[out, inp],
                        &l.weight.iter().copied().collect::<Vec<_>>(),
                    ),
                    bias: g.constant(&format!("layers.{i}.bias"), &[out], &l.bias.to_vec()),
                }
            })
            .collect();
        let std = v.config.reward_std as f32;
        let last = &v.layers[v.layers.len() - 1].weight;
        let row: Vec<f32> = last.iter().map(|w| w * std).collect();
        Self {
            layers,
            activation: v.config.activation,
            grad_row: g.constant("grad_row", &[1, row.len()], &row),
            std: g.scalar("reward_std", std),
            mean: g.scalar("reward_mean", v.config.reward_mean as f32),
            squeeze_axes: g.ints("axes", &[1]),
            zero: g.scalar("zero", 0.0),
            one: g.scalar("one", 1.0),
            half: g.scalar("half", 0.5),
            inv_sqrt2: g.scalar("inv_sqrt2", std::f32::consts::FRAC_1_SQRT_2),
            inv_sqrt_2pi: g.scalar(
                "inv_sqrt_2pi",
                (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2) as f32,
            ),
        }
    }

    /// The hidden layers' forward pass from `h`: the last hidden activation (or `h` itself
    /// for a linear net) and what backward needs.
    fn hidden(&self, g: &mut GraphBuilder, h: &str) -> (String, Vec<Saved>) {
        let mut a = h.to_owned();
        let mut saved = Vec::new();
        for layer in &self.layers[..self.layers.len() - 1] {
            let z = g.op(
                "Gemm",
                &[&a, &layer.weight, &layer.bias],
                &[("transB", Attr::Int(1))],
            );
            let (next, aux) = match self.activation {
                Activation::Relu => (g.op("Relu", &[&z], &[]), String::new()),
                Activation::Tanh => {
                    let t = g.op("Tanh", &[&z], &[]);
                    (t.clone(), t)
                }
                Activation::Silu => {
                    let s = g.op("Sigmoid", &[&z], &[]);
                    (g.op("Mul", &[&z, &s], &[]), s)
                }
                Activation::Gelu => {
                    // PyTorch's exact GELU: z * 0.5 * (1 + erf(z / sqrt 2)).
                    let scaled = g.op("Mul", &[&z, &self.inv_sqrt2], &[]);
                    let erf = g.op("Erf", &[&scaled], &[]);
                    let plus = g.op("Add", &[&erf, &self.one], &[]);
                    let cdf = g.op("Mul", &[&plus, &self.half], &[]);
                    (g.op("Mul", &[&z, &cdf], &[]), cdf)
                }
            };
            saved.push(Saved { z, aux });
            a = next;
        }
        (a, saved)
    }

    /// `V(h)` in reward units, `[batch]`, from the last hidden activation.
    fn value_from(&self, g: &mut GraphBuilder, a: &str) -> String {
        let last = &self.layers[self.layers.len() - 1];
        let raw = g.op(
            "Gemm",
            &[a, &last.weight, &last.bias],
            &[("transB", Attr::Int(1))],
        );
        let scaled = g.op("Mul", &[&raw, &self.std], &[]);
        let shifted = g.op("Add", &[&scaled, &self.mean], &[]);
        g.op("Squeeze", &[&shifted, &self.squeeze_axes], &[])
    }

    /// `dV/dh`, `[batch, d]`, by backpropagation through the saved hidden layers.
    fn grad(&self, g: &mut GraphBuilder, h: &str, saved: &[Saved]) -> String {
        if saved.is_empty() {
            // A linear value: the gradient is the same row for every input.
            let shape = g.op("Shape", &[h], &[]);
            return g.op("Expand", &[&self.grad_row, &shape], &[]);
        }
        let mut upstream = self.grad_row.clone(); // dV/da, [1 or batch, h]
        for (i, s) in saved.iter().enumerate().rev() {
            let dz = match self.activation {
                // PyTorch's threshold_backward: the gradient passes where z > 0.
                Activation::Relu => {
                    let pos = g.op("Greater", &[&s.z, &self.zero], &[]);
                    g.op("Where", &[&pos, &upstream, &self.zero], &[])
                }
                Activation::Tanh => {
                    let sq = g.op("Mul", &[&s.aux, &s.aux], &[]);
                    let d = g.op("Sub", &[&self.one, &sq], &[]);
                    g.op("Mul", &[&upstream, &d], &[])
                }
                Activation::Silu => {
                    // sigmoid * (1 + z * (1 - sigmoid))
                    let rest = g.op("Sub", &[&self.one, &s.aux], &[]);
                    let zr = g.op("Mul", &[&s.z, &rest], &[]);
                    let inner = g.op("Add", &[&self.one, &zr], &[]);
                    let d = g.op("Mul", &[&s.aux, &inner], &[]);
                    g.op("Mul", &[&upstream, &d], &[])
                }
                Activation::Gelu => {
                    // cdf + z * exp(-z^2 / 2) / sqrt(2 pi)
                    let sq = g.op("Mul", &[&s.z, &s.z], &[]);
                    let half_sq = g.op("Mul", &[&sq, &self.half], &[]);
                    let neg = g.op("Neg", &[&half_sq], &[]);
                    let e = g.op("Exp", &[&neg], &[]);
                    let pdf = g.op("Mul", &[&e, &self.inv_sqrt_2pi], &[]);
                    let zpdf = g.op("Mul", &[&s.z, &pdf], &[]);
                    let d = g.op("Add", &[&s.aux, &zpdf], &[]);
                    g.op("Mul", &[&upstream, &d], &[])
                }
            };
            upstream = g.op("MatMul", &[&dz, &self.layers[i].weight], &[]);
        }
        upstream
    }
}

fn dims(d: usize) -> [Dim; 2] {
    [Dim::Named("batch"), Dim::Fixed(d)]
}

/// `value.onnx`.
pub fn value_graph(v: &ValueDir) -> GraphBuilder {
    let mut g = GraphBuilder::new();
    let d = v.config.input_dim;
    let h = g.input("hidden", &dims(d));
    let net = Net::new(&mut g, v);
    let (a, _) = net.hidden(&mut g, &h);
    let value = net.value_from(&mut g, &a);
    g.output(&value, "value", &[Dim::Named("batch")]);
    g
}

/// `value_grad.onnx`.
pub fn value_grad_graph(v: &ValueDir) -> GraphBuilder {
    let mut g = GraphBuilder::new();
    let d = v.config.input_dim;
    let h = g.input("hidden", &dims(d));
    let net = Net::new(&mut g, v);
    let (a, saved) = net.hidden(&mut g, &h);
    let value = net.value_from(&mut g, &a);
    let grad = net.grad(&mut g, &h, &saved);
    g.output(&value, "value", &[Dim::Named("batch")]);
    g.output(&grad, "grad", &dims(d));
    g
}

/// `controller.onnx`.
pub fn controller_graph(v: &ValueDir, spec: &ControllerSpec) -> GraphBuilder {
    let mut g = GraphBuilder::new();
    let d = v.config.input_dim;
    let h0 = g.input("hidden", &dims(d));
    let alpha = g.input("alpha", &[]);
    let net = Net::new(&mut g, v);
    let bound = spec.max_edit_norm.map(|eps| {
        (
            g.scalar("max_edit_norm", eps),
            g.scalar("tiny", f32::MIN_POSITIVE),
        )
    });
    let (a, mut saved) = net.hidden(&mut g, &h0);
    let before = net.value_from(&mut g, &a);
    let mut h = h0.clone();
    for step in 0..spec.steps {
        if step > 0 {
            saved = net.hidden(&mut g, &h).1;
        }
        let grad = net.grad(&mut g, &h, &saved);
        let delta = g.op("Mul", &[&alpha, &grad], &[]);
        h = g.op("Add", &[&h, &delta], &[]);
        if let Some((eps, tiny)) = &bound {
            // u <- u * min(1, eps / ||u||) per row, u = h - h0.
            let u = g.op("Sub", &[&h, &h0], &[]);
            let norm = g.op(
                "ReduceL2",
                &[&u],
                &[("axes", Attr::Ints(vec![1])), ("keepdims", Attr::Int(1))],
            );
            let safe = g.op("Max", &[&norm, tiny], &[]);
            let ratio = g.op("Div", &[eps, &safe], &[]);
            let scale = g.op("Min", &[&ratio, &net.one], &[]);
            let scaled = g.op("Mul", &[&u, &scale], &[]);
            h = g.op("Add", &[&h0, &scaled], &[]);
        }
    }
    let (a, _) = net.hidden(&mut g, &h);
    let after = net.value_from(&mut g, &a);
    g.output(&h, "edited_hidden", &dims(d));
    g.output(&before, "value_before", &[Dim::Named("batch")]);
    g.output(&after, "value_after", &[Dim::Named("batch")]);
    g
}
