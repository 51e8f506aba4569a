//! Mixtral's sparse mixture-of-experts MLP, as transformers computes it: a router picks each
//! token's `top_k` experts by softmax probability (in float32), the chosen probabilities are
//! renormalised to sum to 1, and the token's output is the weighted sum of those experts'
//! gated MLPs.
//!
//! Checkpoints come in two layouts, both read: the Hub's (`block_sparse_moe.gate`,
//! `block_sparse_moe.experts.{e}.w1/w2/w3`, which transformers' `save_pretrained` writes too)
//! and transformers 5's fused one (`mlp.gate`, `mlp.experts.gate_up_proj [E, 2I, H]`,
//! `mlp.experts.down_proj [E, H, I]`), split per expert at load time.

use tch::{Device, Kind, Tensor};

use crate::config::{Activation, ModelConfig};
use crate::error::{Error, Result};
use crate::layers::Linear;
use crate::weights::ParamSource;

/// One expert: `w2(act(w1 x) * w3 x)`.
#[derive(Debug)]
struct Expert {
    w1: Linear,
    w2: Linear,
    w3: Linear,
}

/// The router and the experts of one layer.
#[derive(Debug)]
pub(crate) struct SparseMoe {
    /// `[experts, hidden]`.
    gate: Linear,
    experts: Vec<Expert>,
    top_k: i64,
}

impl SparseMoe {
    /// Reads the layer's router and experts in either layout; `layer_prefix` is the layer's
    /// path (`model.layers.3`).
    pub(crate) fn load(
        w: &dyn ParamSource,
        layer_prefix: &str,
        cfg: &ModelConfig,
        num_experts: usize,
        top_k: usize,
    ) -> Result<Self> {
        let (h, i, e) = (
            cfg.hidden_size as i64,
            cfg.intermediate_size as i64,
            num_experts as i64,
        );
        let hub = format!("{layer_prefix}.block_sparse_moe");
        let fused = format!("{layer_prefix}.mlp");
        let missing = |what: String| Error::MissingExpertTensors {
            layer: layer_prefix.to_owned(),
            missing: what,
            experts: num_experts,
        };
        if let Some(gate) = w.get_opt(&format!("{hub}.gate.weight"), &[e, h])? {
            let mut experts = Vec::with_capacity(num_experts);
            for x in 0..num_experts {
                let get = |name: &str, shape: [i64; 2]| -> Result<Linear> {
                    let key = format!("{hub}.experts.{x}.{name}.weight");
                    match w.get_opt(&key, &shape)? {
                        Some(t) => Ok(Linear::from_weight(t)),
                        None => Err(missing(key)),
                    }
                };
                experts.push(Expert {
                    w1: get("w1", [i, h])?,
                    w2: get("w2", [h, i])?,
                    w3: get("w3", [i, h])?,
                });
            }
            return Ok(Self {
                gate: Linear::from_weight(gate),
                experts,
                top_k: top_k as i64,
            });
        }
        let Some(gate) = w.get_opt(&format!("{fused}.gate.weight"), &[e, h])? else {
            return Err(missing(format!(
                "{hub}.gate.weight (or {fused}.gate.weight)"
            )));
        };
        let get = |name: &str, shape: [i64; 3]| -> Result<Tensor> {
            let key = format!("{fused}.experts.{name}");
            w.get_opt(&key, &shape)?.ok_or_else(|| missing(key))
        };
        let gate_up = get("gate_up_proj", [e, 2 * i, h])?;
        let down = get("down_proj", [e, h, i])?;
        let experts = (0..e)
            .map(|x| {
                let gu = gate_up.f_select(0, x)?;
                Ok(Expert {
                    w1: Linear::from_weight(gu.f_narrow(0, 0, i)?.f_contiguous()?),
                    w3: Linear::from_weight(gu.f_narrow(0, i, i)?.f_contiguous()?),
                    w2: Linear::from_weight(down.f_select(0, x)?.f_contiguous()?),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            gate: Linear::from_weight(gate),
            experts,
            top_k: top_k as i64,
        })
    }

    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub(crate) fn forward(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let shape = x.size();
        let hidden = shape.last().copied().unwrap_or(0);
        let flat = x.f_reshape([-1, hidden])?; // [tokens, hidden]
        let probs = self
            .gate
            .forward(&flat)?
            .f_to_kind(Kind::Float)?
            .f_softmax(-1, Kind::Float)?; // [tokens, experts]
        let (weights, chosen) = probs.f_topk(self.top_k, -1, true, true)?;
        let weights = weights.f_div(&weights.f_sum_dim_intlist(-1, true, Kind::Float)?)?;
        // Which tokens each expert serves, worked out on the host (one copy per layer).
        let chosen_host = Vec::<i64>::try_from(chosen.f_flatten(0, -1)?.f_to_device(Device::Cpu)?)?;
        let mut routed: Vec<(Vec<i64>, Vec<i64>)> =
            vec![(Vec::new(), Vec::new()); self.experts.len()];
        for (slot, &e) in chosen_host.iter().enumerate() {
            let (tokens, slots) = &mut routed[e as usize];
            tokens.push(slot as i64 / self.top_k);
            slots.push(slot as i64);
        }
        let flat_weights = weights.f_flatten(0, -1)?;
        let mut out = flat.f_zeros_like()?;
        for (expert, (tokens, slots)) in self.experts.iter().zip(&routed) {
            if tokens.is_empty() {
                continue;
            }
            let device = flat.device();
            let tokens = Tensor::from_slice(tokens).f_to_device(device)?;
            let slots = Tensor::from_slice(slots).f_to_device(device)?;
            let input = flat.f_index_select(0, &tokens)?;
            let gated = act
                .apply(&expert.w1.forward(&input)?)?
                .f_mul(&expert.w3.forward(&input)?)?;
            // The expert's output times its float32 weight, back in the activation dtype.
            let y = expert
                .w2
                .forward(&gated)?
                .f_mul(&flat_weights.f_index_select(0, &slots)?.f_unsqueeze(-1)?)?
                .f_to_kind(out.kind())?;
            out = out.f_index_add(0, &tokens, &y)?;
        }
        Ok(out.f_reshape(shape.as_slice())?)
    }

    /// Parameters in the Hub layout.
    pub(crate) fn params(&self, layer_prefix: &str, out: &mut Vec<(String, Tensor)>) {
        let hub = format!("{layer_prefix}.block_sparse_moe");
        self.gate.params(&format!("{hub}.gate"), out);
        for (x, e) in self.experts.iter().enumerate() {
            e.w1.params(&format!("{hub}.experts.{x}.w1"), out);
            e.w2.params(&format!("{hub}.experts.{x}.w2"), out);
            e.w3.params(&format!("{hub}.experts.{x}.w3"), out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    use crate::weights::MapSource as Map;

    fn config() -> ModelConfig {
        let hf: crate::config::HfConfig = serde_json::from_value(serde_json::json!({
            "model_type": "mixtral", "vocab_size": 10, "hidden_size": 4, "intermediate_size": 6,
            "num_hidden_layers": 1, "num_attention_heads": 2, "rms_norm_eps": 1e-5,
            "num_local_experts": 3, "num_experts_per_tok": 2
        }))
        .expect("config");
        ModelConfig::from_hf(&hf, std::path::Path::new("config.json")).expect("valid")
    }

    fn hub_weights(seed: i64) -> HashMap<String, Tensor> {
        tch::manual_seed(seed);
        let opts = (Kind::Float, Device::Cpu);
        let mut m = HashMap::new();
        m.insert(
            "l.block_sparse_moe.gate.weight".to_owned(),
            Tensor::randn([3, 4], opts),
        );
        for x in 0..3 {
            for (name, shape) in [("w1", [6, 4]), ("w2", [4, 6]), ("w3", [6, 4])] {
                m.insert(
                    format!("l.block_sparse_moe.experts.{x}.{name}.weight"),
                    Tensor::randn(shape, opts),
                );
            }
        }
        m
    }

    #[test]
    fn matches_the_dense_formula_and_both_layouts_agree() -> Result<()> {
        let cfg = config();
        let hub = hub_weights(0);
        let moe = SparseMoe::load(
            &Map(hub
                .iter()
                .map(|(k, v)| (k.clone(), v.shallow_clone()))
                .collect()),
            "l",
            &cfg,
            3,
            2,
        )?;
        let x = Tensor::randn([2, 3, 4], (Kind::Float, Device::Cpu));
        let got = moe.forward(&x, Activation::Silu)?;
        // Dense reference: every expert on every token, weighted by the renormalised top-2
        // probabilities (0 for the expert not chosen).
        let flat = x.reshape([-1, 4]);
        let probs = flat
            .matmul(&hub["l.block_sparse_moe.gate.weight"].tr())
            .softmax(-1, Kind::Float);
        let (top, idx) = probs.topk(2, -1, true, true);
        let top = &top / top.sum_dim_intlist(-1, true, Kind::Float);
        let dense_w = Tensor::zeros([6, 3], (Kind::Float, Device::Cpu)).scatter(1, &idx, &top);
        let mut want = Tensor::zeros([6, 4], (Kind::Float, Device::Cpu));
        for e in 0..3 {
            let p = |n: &str| hub[&format!("l.block_sparse_moe.experts.{e}.{n}.weight")].tr();
            let y = (flat.matmul(&p("w1")).silu() * flat.matmul(&p("w3"))).matmul(&p("w2"));
            want += y * dense_w.select(1, e).unsqueeze(-1);
        }
        let d = (got.reshape([-1, 4]) - &want).abs().max().double_value(&[]);
        assert!(d < 1e-5, "sparse vs dense: {d}");
        // The fused layout of the same weights gives the same output.
        let stack = |n: &str| {
            Tensor::stack(
                &(0..3)
                    .map(|e| {
                        hub[&format!("l.block_sparse_moe.experts.{e}.{n}.weight")].shallow_clone()
                    })
                    .collect::<Vec<_>>(),
                0,
            )
        };
        let mut fused = HashMap::new();
        fused.insert(
            "l.mlp.gate.weight".to_owned(),
            hub["l.block_sparse_moe.gate.weight"].shallow_clone(),
        );
        fused.insert(
            "l.mlp.experts.gate_up_proj".to_owned(),
            Tensor::cat(&[stack("w1"), stack("w3")], 1),
        );
        fused.insert("l.mlp.experts.down_proj".to_owned(), stack("w2"));
        let moe2 = SparseMoe::load(&Map(fused), "l", &cfg, 3, 2)?;
        let d = (moe2.forward(&x, Activation::Silu)? - got)
            .abs()
            .max()
            .double_value(&[]);
        assert!(d < 1e-6, "fused vs hub layout: {d}");
        Ok(())
    }

    #[test]
    fn a_missing_expert_is_named() {
        let cfg = config();
        let mut hub = hub_weights(1);
        hub.remove("l.block_sparse_moe.experts.2.w3.weight");
        let err = SparseMoe::load(&Map(hub), "l", &cfg, 3, 2)
            .expect_err("expert 2 lacks w3")
            .to_string();
        assert!(
            err.contains("l.block_sparse_moe.experts.2.w3.weight") && err.contains("3 experts"),
            "{err}"
        );
        let err = SparseMoe::load(&Map(HashMap::new()), "l", &cfg, 3, 2)
            .expect_err("no experts")
            .to_string();
        assert!(err.contains("gate.weight"), "{err}");
    }
}
