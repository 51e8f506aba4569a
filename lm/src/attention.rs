//! Self-attention with grouped key/value heads and rotary positions, and the extras some
//! families add: fused q/k/v projections (Phi-3, Falcon), per-head q/k norms (Qwen3, Gemma 3),
//! a query scale of its own and score soft-capping (Gemma 2), sliding windows. Also the
//! attention masks of one forward pass.

use tch::{Device, Kind, Tensor};

use crate::cache::KvCache;
use crate::config::{AttentionWindow, ModelConfig, QkvLayout};
use crate::error::Result;
use crate::kernels;
use crate::layers::{Linear, Norm};
use crate::rope::apply_rotary;
use crate::weights::ParamSource;

/// cos/sin `[batch, 1, seq, head_dim]` of one forward pass: of the full-attention layers, and
/// (Gemma 3) of the sliding-window layers.
#[derive(Debug)]
pub(crate) struct Rotary {
    pub(crate) global: (Tensor, Tensor),
    pub(crate) local: Option<(Tensor, Tensor)>,
}

#[derive(Debug)]
enum Projections {
    Separate {
        q_proj: Linear,
        k_proj: Linear,
        v_proj: Linear,
    },
    /// One map for all three; `joined` when a checkpoint's separate q/k/v maps were joined
    /// (`[q | k | v]`) for inference, one product instead of three, their parameters keeping
    /// their names.
    Fused {
        qkv: Linear,
        layout: QkvLayout,
        joined: bool,
    },
}

/// Checkpoint names of an attention layer's projections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ProjectionNames {
    /// The fused q/k/v projection (`qkv_proj`, `query_key_value`).
    pub(crate) fused: &'static str,
    /// The output projection (`o_proj`, `dense`).
    pub(crate) out: &'static str,
}

/// Multi-head attention of one layer.
#[derive(Debug)]
pub(crate) struct Attention {
    proj: Projections,
    o_proj: Linear,
    /// Per-head norms `[head_dim]` of queries and keys.
    q_norm: Option<Norm>,
    k_norm: Option<Norm>,
    names: ProjectionNames,
    num_heads: i64,
    num_kv_heads: i64,
    head_dim: i64,
    window: AttentionWindow,
    scale: f64,
    softcap: Option<f64>,
    /// Whether this layer takes the local (sliding-window) rotary table.
    local_rope: bool,
}

impl Attention {
    pub(crate) fn load(
        w: &dyn ParamSource,
        prefix: &str,
        cfg: &ModelConfig,
        window: AttentionWindow,
        names: ProjectionNames,
    ) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let (q_dim, kv_dim) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        let linear = |name: &str, from: usize, to: usize, bias: bool| {
            Linear::load(w, &format!("{prefix}.{name}"), from, to, bias)
        };
        let proj = match cfg.qkv {
            QkvLayout::Separate => Projections::Separate {
                q_proj: linear("q_proj", h, q_dim, cfg.qkv_bias)?,
                k_proj: linear("k_proj", h, kv_dim, cfg.qkv_bias)?,
                v_proj: linear("v_proj", h, kv_dim, cfg.qkv_bias)?,
            },
            layout => Projections::Fused {
                qkv: linear(names.fused, h, q_dim + 2 * kv_dim, cfg.qkv_bias)?,
                layout,
                joined: false,
            },
        };
        let head_norm = |name: &str| -> Result<Option<Norm>> {
            if !cfg.qk_norm {
                return Ok(None);
            }
            let path = format!("{prefix}.{name}");
            Ok(Some(Norm::load(w, &path, d, cfg.norm, cfg.rms_norm_eps)?))
        };
        Ok(Self {
            proj,
            o_proj: linear(names.out, q_dim, h, cfg.o_bias)?,
            q_norm: head_norm("q_norm")?,
            k_norm: head_norm("k_norm")?,
            names,
            num_heads: cfg.num_heads as i64,
            num_kv_heads: cfg.num_kv_heads as i64,
            head_dim: d as i64,
            window,
            scale: cfg.attention_scale,
            softcap: cfg.attn_softcap,
            local_rope: cfg.local_rope.is_some() && matches!(window, AttentionWindow::Sliding(_)),
        })
    }

    /// Queries, keys and values `[batch, seq, heads, head_dim]` of `x` `[batch, seq, hidden]`.
    fn project(&self, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s) = (x.size()[0], x.size()[1]);
        let (n, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        Ok(match &self.proj {
            Projections::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => (
                q_proj.forward(x)?.f_view([b, s, n, d])?,
                k_proj.forward(x)?.f_view([b, s, kv, d])?,
                v_proj.forward(x)?.f_view([b, s, kv, d])?,
            ),
            Projections::Fused { qkv, layout, .. } => {
                let fused = qkv.forward(x)?;
                match layout {
                    // [q (n heads) | k (kv heads) | v (kv heads)]
                    QkvLayout::Separate | QkvLayout::Fused => (
                        fused.f_narrow(-1, 0, n * d)?.f_reshape([b, s, n, d])?,
                        fused
                            .f_narrow(-1, n * d, kv * d)?
                            .f_reshape([b, s, kv, d])?,
                        fused
                            .f_narrow(-1, (n + kv) * d, kv * d)?
                            .f_reshape([b, s, kv, d])?,
                    ),
                    // Per kv group: its n / kv queries, then its key and its value.
                    QkvLayout::FusedGrouped => {
                        let g = n / kv;
                        let grouped = fused.f_view([b, s, kv, g + 2, d])?;
                        (
                            grouped.f_narrow(3, 0, g)?.f_reshape([b, s, n, d])?,
                            grouped.f_select(3, g)?,
                            grouped.f_select(3, g + 1)?,
                        )
                    }
                    // Per head: its query, key and value.
                    QkvLayout::FusedPerHead => {
                        let heads = fused.f_view([b, s, n, 3, d])?;
                        (
                            heads.f_select(3, 0)?,
                            heads.f_select(3, 1)?,
                            heads.f_select(3, 2)?,
                        )
                    }
                }
            }
        })
    }

    /// `x` `[batch, seq, hidden]` -> `[batch, seq, hidden]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        masks: &Masks,
        mut cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Result<Tensor> {
        if let Some(packed) = &masks.packed {
            return self.forward_packed(x, rotary, packed, cache, layer);
        }
        if let Some(cache) = cache.as_deref_mut() {
            if let Some(out) = self.decode_step(x, rotary, masks, cache, layer)? {
                return self.o_proj.forward(&out);
            }
        }
        let (b, s) = (x.size()[0], x.size()[1]);
        let (q, k, v) = self.heads(x, rotary)?;
        // [batch, kv_heads, past + seq, head_dim]
        let (k, v) = match cache {
            Some(cache) => cache.append(layer, &k, &v)?,
            None => (k, v),
        };
        let out = self.attend(&q, &k, &v, masks.get(self.window))?;
        let out = out
            .f_transpose(1, 2)?
            .f_reshape([b, s, self.num_heads * self.head_dim])?;
        self.o_proj.forward(&out)
    }

    /// Queries `[batch, heads, seq, head_dim]`, keys and values `[batch, kv_heads, seq,
    /// head_dim]` of `x` `[batch, seq, hidden]`: projected, normed per head where the family
    /// does, queries and keys rotated.
    fn heads(&self, x: &Tensor, rotary: &Rotary) -> Result<(Tensor, Tensor, Tensor)> {
        let (q, k, v) = self.project(x)?;
        let norm = |t: Tensor, n: &Option<Norm>| match n {
            Some(n) => n.forward(&t),
            None => Ok(t),
        };
        let q = norm(q, &self.q_norm)?.f_transpose(1, 2)?;
        let k = norm(k, &self.k_norm)?.f_transpose(1, 2)?;
        let (cos, sin) = self.cos_sin(rotary);
        Ok((
            apply_rotary(&q, cos, sin)?,
            apply_rotary(&k, cos, sin)?,
            v.f_transpose(1, 2)?,
        ))
    }

    /// Attention of `q` `[batch, heads, seq, head_dim]` over `k`, `v`
    /// `[batch, kv_heads, keys, head_dim]` under `mask`: `[batch, heads, seq, head_dim]`.
    fn attend(&self, q: &Tensor, k: &Tensor, v: &Tensor, mask: &Mask) -> Result<Tensor> {
        Ok(match self.softcap {
            None => Tensor::f_scaled_dot_product_attention(
                q,
                k,
                v,
                mask.tensor.as_ref(),
                0.0,
                mask.is_causal,
                self.scale,
                self.num_kv_heads != self.num_heads,
            )?,
            Some(cap) => self.softcapped(q, k, v, mask, cap)?,
        })
    }

    /// A packed prefill ([`Packed`]): `x` `[1, tokens, hidden]` holds the rows' real tokens
    /// side by side; each row's queries attend to its own keys only (causal, with this layer's
    /// window), and its keys and values land in row `row` of the empty `cache`, right-aligned
    /// to the batch's width as a left-padded prefill would leave them (zeros at the padding,
    /// which later masks never let through).
    fn forward_packed(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        packed: &Packed,
        cache: Option<&mut KvCache>,
        layer: usize,
    ) -> Result<Tensor> {
        let (n, kv, d) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let tokens = x.size()[1];
        let (q, k, v) = self.heads(x, rotary)?;
        let buffers = match cache {
            Some(cache) => {
                let shape = [packed.rows.len() as i64, kv, packed.width, d];
                Some(cache.room(layer, &shape, (k.kind(), k.device()), packed.width)?)
            }
            None => None,
        };
        let mut outs = Vec::with_capacity(packed.rows.len());
        for (r, seg) in packed.rows.iter().enumerate() {
            let (qs, ks, vs) = (
                q.f_narrow(2, seg.start, seg.len)?,
                k.f_narrow(2, seg.start, seg.len)?,
                v.f_narrow(2, seg.start, seg.len)?,
            );
            if let Some((kb, vb)) = buffers.as_deref() {
                let pad = packed.width - seg.len;
                for (buffer, new) in [(kb, &ks), (vb, &vs)] {
                    let row = buffer.f_narrow(0, r as i64, 1)?;
                    let _zeroed = row.f_narrow(2, 0, pad)?.f_zero_()?;
                    row.f_narrow(2, pad, seg.len)?.f_copy_(new)?;
                }
            }
            outs.push(self.attend(&qs, &ks, &vs, seg.masks.get(self.window))?);
        }
        let out = Tensor::f_cat(&outs, 2)?
            .f_transpose(1, 2)?
            .f_reshape([1, tokens, n * d])?;
        self.o_proj.forward(&out)
    }

    /// One decoding step (one new position per row) in the CPU kernel
    /// ([`kernels::decode_attention`]), where it applies: float32 on the CPU, `[q | k | v]` in
    /// one projection, no per-head norms, no soft cap. Returns the attention's output before
    /// `o_proj`, `[batch, 1, heads head_dim]`, or `None` to take the libtorch ops.
    fn decode_step(
        &self,
        x: &Tensor,
        rotary: &Rotary,
        masks: &Masks,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Option<Tensor>> {
        let Projections::Fused {
            qkv,
            layout: QkvLayout::Fused | QkvLayout::Separate,
            ..
        } = &self.proj
        else {
            return Ok(None);
        };
        let (cos, sin) = self.cos_sin(rotary);
        let mask = masks.get(self.window);
        if x.size()[1] != 1
            || self.q_norm.is_some()
            || self.softcap.is_some()
            || mask.is_causal
            || !kernels::applies(x, &[cos, sin])
            || mask.tensor.as_ref().is_some_and(|m| !m.is_contiguous())
        {
            return Ok(None);
        }
        let fused = qkv.forward(x)?.f_contiguous()?; // [batch, 1, (heads + 2 kv_heads) head_dim]
        let shape = [x.size()[0], self.num_kv_heads, 1, self.head_dim];
        let start = cache.len();
        let (keys, values) = cache.room(layer, &shape, (x.kind(), Device::Cpu), 1)?;
        if !keys.is_contiguous() || !values.is_contiguous() {
            return Ok(None);
        }
        let heads = kernels::DecodeHeads {
            heads: self.num_heads as usize,
            kv_heads: self.num_kv_heads as usize,
            head_dim: self.head_dim as usize,
            scale: self.scale as f32,
        };
        let step = kernels::DecodeStep {
            qkv: &fused,
            cos,
            sin,
            allowed: mask.tensor.as_ref(),
            start,
            heads,
        };
        let out = kernels::decode_attention(&step, keys, values)?;
        Ok(Some(out))
    }

    /// The rotary table this layer takes.
    fn cos_sin<'r>(&self, rotary: &'r Rotary) -> (&'r Tensor, &'r Tensor) {
        let (cos, sin) = match (&rotary.local, self.local_rope) {
            (Some(local), true) => local,
            _ => &rotary.global,
        };
        (cos, sin)
    }

    /// Attention with `cap * tanh(score / cap)` on the scores, as transformers' eager Gemma 2
    /// attention (no fused kernel takes a soft cap): softmax in float32.
    fn softcapped(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: &Mask,
        cap: f64,
    ) -> Result<Tensor> {
        let groups = self.num_heads / self.num_kv_heads;
        let repeat = |t: &Tensor| -> Result<Tensor> {
            Ok(if groups == 1 {
                t.shallow_clone()
            } else {
                t.f_repeat_interleave_self_int(groups, 1, None::<i64>)?
            })
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = q
            .f_matmul(&k.f_transpose(-2, -1)?)?
            .f_mul_scalar(self.scale)?
            .f_div_scalar(cap)?
            .f_tanh()?
            .f_mul_scalar(cap)?;
        let (seq, keys) = (q.size()[2], k.size()[2]);
        let scores = match mask.allowed(seq, keys, q.device())? {
            Some(allowed) => scores.f_masked_fill(&allowed.f_logical_not()?, f64::NEG_INFINITY)?,
            None => scores,
        };
        let probs = scores.f_softmax(-1, Kind::Float)?.f_to_kind(q.kind())?;
        Ok(probs.f_matmul(&v)?)
    }

    /// Joins separate q/k/v projections into one map (for inference: the joined weight is a
    /// new tensor, not the checkpoint's).
    pub(crate) fn join_projections(&mut self) -> Result<()> {
        if let Projections::Separate {
            q_proj,
            k_proj,
            v_proj,
        } = &self.proj
        {
            self.proj = Projections::Fused {
                qkv: Linear::join(&[q_proj, k_proj, v_proj])?,
                layout: QkvLayout::Fused,
                joined: true,
            };
        }
        Ok(())
    }

    /// Stores every projection's weight as `[in, out]` ([`Linear::store_in_out`]).
    pub(crate) fn store_in_out(&mut self, pack: bool) -> Result<()> {
        match &mut self.proj {
            Projections::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => {
                q_proj.store_in_out(pack)?;
                k_proj.store_in_out(pack)?;
                v_proj.store_in_out(pack)?;
            }
            Projections::Fused { qkv, .. } => qkv.store_in_out(pack)?,
        }
        self.o_proj.store_in_out(pack)
    }

    pub(crate) fn params(&self, prefix: &str, out: &mut Vec<(String, Tensor)>) {
        match &self.proj {
            Projections::Separate {
                q_proj,
                k_proj,
                v_proj,
            } => {
                q_proj.params(&format!("{prefix}.q_proj"), out);
                k_proj.params(&format!("{prefix}.k_proj"), out);
                v_proj.params(&format!("{prefix}.v_proj"), out);
            }
            Projections::Fused {
                qkv, joined: false, ..
            } => qkv.params(&format!("{prefix}.{}", self.names.fused), out),
            Projections::Fused {
                qkv, joined: true, ..
            } => {
                let (q, kv) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                qkv.split_params(
                    &[
                        (format!("{prefix}.q_proj"), q),
                        (format!("{prefix}.k_proj"), kv),
                        (format!("{prefix}.v_proj"), kv),
                    ],
                    out,
                );
            }
        }
        if let Some(n) = &self.q_norm {
            n.params(&format!("{prefix}.q_norm"), out);
        }
        if let Some(n) = &self.k_norm {
            n.params(&format!("{prefix}.k_norm"), out);
        }
        self.o_proj
            .params(&format!("{prefix}.{}", self.names.out), out);
    }
}

/// An attention mask for one window kind: either a boolean tensor `[batch, 1, seq, keys]`
/// (true = attend) or none at all with or without libtorch's causal flag.
#[derive(Debug)]
pub(crate) struct Mask {
    tensor: Option<Tensor>,
    is_causal: bool,
}

impl Mask {
    /// The mask as a boolean tensor `[batch | 1, 1, seq, keys]`, `None` when every key is
    /// visible.
    fn allowed(&self, seq: i64, keys: i64, device: Device) -> Result<Option<Tensor>> {
        if let Some(t) = &self.tensor {
            return Ok(Some(t.shallow_clone()));
        }
        if !self.is_causal {
            return Ok(None);
        }
        // libtorch's causal flag: the diagonal at the top-left corner (no cached keys).
        let q_pos = Tensor::f_arange(seq, (Kind::Int64, device))?.f_unsqueeze(1)?;
        let k_pos = Tensor::f_arange(keys, (Kind::Int64, device))?.f_unsqueeze(0)?;
        Ok(Some(k_pos.f_le_tensor(&q_pos)?.f_view([1, 1, seq, keys])?))
    }
}

/// The masks of one forward pass.
#[derive(Debug)]
pub(crate) struct Masks {
    full: Mask,
    /// Per window size (a model has at most one).
    sliding: Option<(usize, Mask)>,
    /// A packed prefill's rows, which replace both masks.
    packed: Option<Packed>,
}

/// A prefill of left-padded rows with the padding left out: the rows' real tokens side by side
/// in one row of `sum(len)` tokens, each row attending within its own segment. The products,
/// norms and MLPs then do no work for padding, and attention none across rows (transformers'
/// padded prefill computes both and masks them).
#[derive(Debug)]
pub(crate) struct Packed {
    /// Per batch row, in order.
    pub(crate) rows: Vec<Segment>,
    /// The batch's width (its longest row).
    pub(crate) width: i64,
}

/// One row of a [`Packed`] prefill.
#[derive(Debug)]
pub(crate) struct Segment {
    /// Where the row's tokens start in the packed row.
    pub(crate) start: i64,
    /// Its real tokens.
    pub(crate) len: i64,
    /// Its causal masks (with the model's window), as of an unpadded row of `len` tokens.
    pub(crate) masks: Masks,
}

impl Masks {
    fn get(&self, window: AttentionWindow) -> &Mask {
        match (window, &self.sliding) {
            (AttentionWindow::Sliding(w), Some((sw, mask))) if *sw == w => mask,
            _ => &self.full,
        }
    }

    /// Builds the masks for `seq` new queries after `past` cached positions.
    pub(crate) fn new(
        key_mask: Option<&Tensor>,
        windows: &[AttentionWindow],
        past: i64,
        seq: i64,
        device: Device,
    ) -> Result<Self> {
        let sliding_window = windows.iter().find_map(|w| match w {
            AttentionWindow::Sliding(w) => Some(*w),
            AttentionWindow::Full => None,
        });
        let full = Self::build(key_mask, None, past, seq, device)?;
        let sliding = match sliding_window {
            Some(w) => Some((w, Self::build(key_mask, Some(w as i64), past, seq, device)?)),
            None => None,
        };
        Ok(Self {
            full,
            sliding,
            packed: None,
        })
    }

    /// The masks of a packed prefill.
    pub(crate) fn packed(packed: Packed) -> Self {
        Self {
            full: Mask {
                tensor: None,
                is_causal: true,
            },
            sliding: None,
            packed: Some(packed),
        }
    }

    fn build(
        key_mask: Option<&Tensor>,
        window: Option<i64>,
        past: i64,
        seq: i64,
        device: Device,
    ) -> Result<Mask> {
        let keys = past + seq;
        let window_matters = window.is_some_and(|w| keys > w);
        // No padding: libtorch's own causal masking (one query needs none). Several queries
        // after cached positions need the offset mask built below (libtorch's causal flag
        // aligns the diagonal to the top-left corner).
        if key_mask.is_none() && !window_matters && (seq == 1 || past == 0) {
            return Ok(Mask {
                tensor: None,
                is_causal: seq > 1,
            });
        }
        // Query i sits at cache position past + i; key j is visible when j <= past + i,
        // (window) past + i - j < w, and j holds a real token. A padding query also sees
        // itself, so that no row is entirely masked (that would give NaN, and NaN * 0 is NaN).
        let q_pos = Tensor::f_arange_start(past, keys, (Kind::Int64, device))?.f_unsqueeze(1)?;
        let k_pos = Tensor::f_arange(keys, (Kind::Int64, device))?.f_unsqueeze(0)?;
        let mut allowed = k_pos.f_le_tensor(&q_pos)?; // [seq, keys]
        if let Some(w) = window {
            allowed = allowed.f_logical_and(&q_pos.f_sub(&k_pos)?.f_lt(w)?)?;
        }
        let allowed = match key_mask {
            Some(m) => allowed
                .f_unsqueeze(0)?
                .f_logical_and(&m.f_unsqueeze(1)?)?
                .f_logical_or(&k_pos.f_eq_tensor(&q_pos)?.f_unsqueeze(0)?)?,
            None => allowed.f_unsqueeze(0)?,
        };
        Ok(Mask {
            tensor: Some(allowed.f_unsqueeze(1)?), // [batch | 1, 1, seq, keys]
            is_causal: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::weights::MapSource;

    /// A Falcon config of 4 heads of 2 dims (hidden 8) in one of its q/k/v layouts.
    fn falcon(extra: serde_json::Value) -> ModelConfig {
        let mut v = serde_json::json!({
            "model_type": "falcon", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 4
        });
        for (k, x) in extra.as_object().expect("object") {
            v[k] = x.clone();
        }
        let hf: crate::config::HfConfig = serde_json::from_value(v).expect("config");
        ModelConfig::from_hf(&hf, std::path::Path::new("config.json")).expect("valid")
    }

    /// The rows of the fused projection that land in each head of q, k and v: with the weight's
    /// first column `0, 1, 2, ...` and the input `e_0`, the projection's output is its row index.
    fn rows(cfg: &ModelConfig) -> Result<(Vec<i64>, Vec<i64>, Vec<i64>)> {
        let out = ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim) as i64;
        let weight = Tensor::zeros([out, 8], (Kind::Float, Device::Cpu));
        weight
            .narrow(1, 0, 1)
            .copy_(&Tensor::arange(out, (Kind::Float, Device::Cpu)).unsqueeze(1));
        let w = MapSource(HashMap::from([
            ("a.query_key_value.weight".to_owned(), weight),
            (
                "a.dense.weight".to_owned(),
                Tensor::zeros([8, 8], (Kind::Float, Device::Cpu)),
            ),
        ]));
        let names = ProjectionNames {
            fused: "query_key_value",
            out: "dense",
        };
        let attn = Attention::load(&w, "a", cfg, AttentionWindow::Full, names)?;
        let x = Tensor::zeros([1, 1, 8], (Kind::Float, Device::Cpu));
        let _ = x.narrow(2, 0, 1).fill_(1.0);
        let (q, k, v) = attn.project(&x)?;
        let flat = |t: Tensor| -> Result<Vec<i64>> {
            Ok(Vec::<f32>::try_from(t.f_flatten(0, -1)?)?
                .into_iter()
                .map(|r| r as i64)
                .collect())
        };
        Ok((flat(q)?, flat(k)?, flat(v)?))
    }

    #[test]
    fn falcon_qkv_layouts_split_as_transformers() -> Result<()> {
        // Falcon-7B: all queries, then the one key and the one value.
        let cfg = falcon(serde_json::json!({"multi_query": true}));
        assert_eq!(cfg.qkv, QkvLayout::Fused);
        assert_eq!(rows(&cfg)?, ((0..8).collect(), vec![8, 9], vec![10, 11]));
        // New decoder architecture, 2 kv groups of 2 queries: per group q q k v.
        let cfg = falcon(serde_json::json!({"new_decoder_architecture": true, "num_kv_heads": 2}));
        assert_eq!(cfg.qkv, QkvLayout::FusedGrouped);
        assert_eq!(
            rows(&cfg)?,
            (
                vec![0, 1, 2, 3, 8, 9, 10, 11],
                vec![4, 5, 12, 13],
                vec![6, 7, 14, 15]
            )
        );
        // Neither: per head q k v.
        let cfg = falcon(serde_json::json!({"multi_query": false}));
        assert_eq!(cfg.qkv, QkvLayout::FusedPerHead);
        assert_eq!(
            rows(&cfg)?,
            (
                vec![0, 1, 6, 7, 12, 13, 18, 19],
                vec![2, 3, 8, 9, 14, 15, 20, 21],
                vec![4, 5, 10, 11, 16, 17, 22, 23]
            )
        );
        Ok(())
    }
}
