//! The feed-forward half of a block: gated (Llama, Gemma), gated with a fused projection
//! (Phi-3), plain (Falcon) or a sparse mixture of experts (Mixtral, in [`crate::moe`]).

use tch::Tensor;

use crate::config::{Activation, MlpKind, ModelConfig};
use crate::error::Result;
use crate::kernels;
use crate::layers::Linear;
use crate::moe::SparseMoe;
use crate::weights::ParamSource;

#[derive(Debug)]
enum Layers {
    /// `down(act(gate(x)) * up(x))`.
    Gated {
        gate_proj: Linear,
        up_proj: Linear,
        down_proj: Linear,
    },
    /// The same with `gate_up_proj` = `[gate; up]`; `joined` when a checkpoint's separate
    /// gate and up maps were joined for inference (their parameters keep their names).
    GatedFused {
        gate_up_proj: Linear,
        down_proj: Linear,
        joined: bool,
    },
    /// `dense_4h_to_h(act(dense_h_to_4h(x)))`.
    Plain {
        dense_h_to_4h: Linear,
        dense_4h_to_h: Linear,
    },
    Moe(SparseMoe),
}

/// A block's MLP.
#[derive(Debug)]
pub(crate) struct Mlp {
    layers: Layers,
    act: Activation,
}

impl Mlp {
    /// `prefix` is the MLP's path (`model.layers.3.mlp`); a mixture of experts reads its own
    /// paths under the layer's `layer_prefix`.
    pub(crate) fn load(
        w: &dyn ParamSource,
        prefix: &str,
        layer_prefix: &str,
        cfg: &ModelConfig,
    ) -> Result<Self> {
        let (h, i, bias) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        let linear = |name: &str, from: usize, to: usize| {
            Linear::load(w, &format!("{prefix}.{name}"), from, to, bias)
        };
        let layers = match cfg.mlp {
            MlpKind::Gated => Layers::Gated {
                gate_proj: linear("gate_proj", h, i)?,
                up_proj: linear("up_proj", h, i)?,
                down_proj: linear("down_proj", i, h)?,
            },
            MlpKind::GatedFused => Layers::GatedFused {
                gate_up_proj: linear("gate_up_proj", h, 2 * i)?,
                down_proj: linear("down_proj", i, h)?,
                joined: false,
            },
            MlpKind::Plain => Layers::Plain {
                dense_h_to_4h: linear("dense_h_to_4h", h, i)?,
                dense_4h_to_h: linear("dense_4h_to_h", i, h)?,
            },
            MlpKind::Moe { num_experts, top_k } => {
                Layers::Moe(SparseMoe::load(w, layer_prefix, cfg, num_experts, top_k)?)
            }
        };
        Ok(Self {
            layers,
            act: cfg.activation,
        })
    }

    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match &self.layers {
            Layers::Gated {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                let gate = self.act.apply(&gate_proj.forward(x)?)?;
                down_proj.forward(&gate.f_mul(&up_proj.forward(x)?)?)
            }
            Layers::GatedFused {
                gate_up_proj,
                down_proj,
                ..
            } => {
                let both = gate_up_proj.forward(x)?;
                if self.act == Activation::Silu && kernels::applies(&both, &[]) {
                    return down_proj.forward(&kernels::silu_mul(&both)?);
                }
                let half = both.size().last().copied().unwrap_or(0) / 2;
                let gate = self.act.apply(&both.f_narrow(-1, 0, half)?)?;
                down_proj.forward(&both.f_narrow(-1, half, half)?.f_mul(&gate)?)
            }
            Layers::Plain {
                dense_h_to_4h,
                dense_4h_to_h,
            } => dense_4h_to_h.forward(&self.act.apply(&dense_h_to_4h.forward(x)?)?),
            Layers::Moe(moe) => moe.forward(x, self.act),
        }
    }

    /// Joins separate gate and up maps into one (for inference: one matrix product instead of
    /// two; the joined weight is a new tensor, not the checkpoint's).
    pub(crate) fn join_projections(&mut self) -> Result<()> {
        if let Layers::Gated {
            gate_proj,
            up_proj,
            down_proj,
        } = &mut self.layers
        {
            let gate_up_proj = Linear::join(&[gate_proj, up_proj])?;
            let down_proj = std::mem::replace(down_proj, Linear::from_weight(Tensor::new()));
            self.layers = Layers::GatedFused {
                gate_up_proj,
                down_proj,
                joined: true,
            };
        }
        Ok(())
    }

    /// Stores the weights of a dense MLP as `[in, out]` ([`Linear::store_in_out`]); a mixture
    /// of experts keeps its layout (its experts see few rows each).
    pub(crate) fn store_in_out(&mut self, pack: bool) -> Result<()> {
        match &mut self.layers {
            Layers::Gated {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                gate_proj.store_in_out(pack)?;
                up_proj.store_in_out(pack)?;
                down_proj.store_in_out(pack)
            }
            Layers::GatedFused {
                gate_up_proj,
                down_proj,
                ..
            } => {
                gate_up_proj.store_in_out(pack)?;
                down_proj.store_in_out(pack)
            }
            Layers::Plain {
                dense_h_to_4h,
                dense_4h_to_h,
            } => {
                dense_h_to_4h.store_in_out(pack)?;
                dense_4h_to_h.store_in_out(pack)
            }
            Layers::Moe(_) => Ok(()),
        }
    }

    /// Parameters by checkpoint name (`prefix` as in [`Mlp::load`]).
    pub(crate) fn params(&self, prefix: &str, layer_prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let mut add = |name: &str, l: &Linear| l.params(&format!("{prefix}.{name}"), out);
        match &self.layers {
            Layers::Gated {
                gate_proj,
                up_proj,
                down_proj,
            } => {
                add("gate_proj", gate_proj);
                add("up_proj", up_proj);
                add("down_proj", down_proj);
            }
            Layers::GatedFused {
                gate_up_proj,
                down_proj,
                joined: false,
            } => {
                add("gate_up_proj", gate_up_proj);
                add("down_proj", down_proj);
            }
            Layers::GatedFused {
                gate_up_proj,
                down_proj,
                joined: true,
            } => {
                let rows = gate_up_proj.out_features();
                gate_up_proj.split_params(
                    &[
                        (format!("{prefix}.gate_proj"), rows / 2),
                        (format!("{prefix}.up_proj"), rows / 2),
                    ],
                    out,
                );
                down_proj.params(&format!("{prefix}.down_proj"), out);
            }
            Layers::Plain {
                dense_h_to_4h,
                dense_4h_to_h,
            } => {
                add("dense_h_to_4h", dense_h_to_4h);
                add("dense_4h_to_h", dense_4h_to_h);
            }
            Layers::Moe(moe) => moe.params(layer_prefix, out),
        }
    }
}
