//! Which GGUF tensor becomes which Hugging Face weight, with which shape, and in which row
//! order.
//!
//! | GGUF                        | HF                                               |
//! |-----------------------------|--------------------------------------------------|
//! | `token_embd.weight`         | `model.embed_tokens.weight`                      |
//! | `blk.N.attn_norm.weight`    | `model.layers.N.input_layernorm.weight`          |
//! | `blk.N.attn_{q,k,v}.weight` | `model.layers.N.self_attn.{q,k,v}_proj.weight` (`.bias` too for qwen2) |
//! | `blk.N.attn_output.weight`  | `model.layers.N.self_attn.o_proj.weight`         |
//! | `blk.N.ffn_norm.weight`     | `model.layers.N.post_attention_layernorm.weight` |
//! | `blk.N.ffn_{gate,up,down}.weight` | `model.layers.N.mlp.{gate,up,down}_proj.weight` |
//! | `output_norm.weight`        | `model.norm.weight`                              |
//! | `output.weight` (absent when tied) | `lm_head.weight`                          |
//!
//! GGUF lists dimensions fastest first, so an HF `[out, in]` weight has GGUF dims `[in, out]`.
//! For the llama family llama.cpp stores the rows of Q and K with the two rotary halves of
//! each head interleaved; [`TensorPlan::source_row`] undoes it (as transformers'
//! `LlamaTensorProcessor._reverse_permute_weights` does), with the query heads for Q and the
//! key/value heads for K.

use std::collections::HashMap;

use crate::config::ModelConfig;
use crate::file::check_dequantizable;
use crate::header::TensorInfo;
use crate::{Error, Result};

/// One HF weight and the GGUF tensor it is made from.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorPlan<'a> {
    pub hf_name: String,
    pub source: &'a TensorInfo,
    /// The HF shape (slowest dimension first).
    pub shape: Vec<u64>,
    /// For Q and K of the llama family: the number of heads whose rows llama.cpp interleaved.
    pub unpermute_heads: Option<u64>,
}

impl TensorPlan<'_> {
    /// The number of rows (elements of the fastest dimension form a row).
    pub fn rows(&self) -> u64 {
        self.source.n_elements / self.source.row_len().max(1)
    }

    /// The GGUF row that HF row `row` is stored in.
    pub fn source_row(&self, row: u64) -> u64 {
        match self.unpermute_heads {
            Some(heads) if heads > 0 && self.rows() / heads >= 2 => {
                interleaved_row(row, self.rows() / heads)
            }
            _ => row,
        }
    }
}

/// Where llama.cpp put row `row` of a Q/K weight with heads of `head_dim` rows: HF row
/// `h * head_dim + i * head_dim / 2 + j` (half `i`, position `j`) is GGUF row
/// `h * head_dim + 2 * j + i`.
fn interleaved_row(row: u64, head_dim: u64) -> u64 {
    let half = head_dim / 2;
    let (head, within) = (row / head_dim, row % head_dim);
    let (i, j) = (within / half, within % half);
    head * head_dim + 2 * j + i
}

/// A weight the model needs: GGUF name, HF name, HF shape, heads to un-interleave.
struct Wanted {
    gguf: String,
    hf: String,
    shape: Vec<u64>,
    unpermute_heads: Option<u64>,
}

fn want(gguf: &str, hf: &str, shape: &[u64]) -> Wanted {
    Wanted {
        gguf: gguf.to_owned(),
        hf: hf.to_owned(),
        shape: shape.to_vec(),
        unpermute_heads: None,
    }
}

/// Every weight a model of `config` has, in HF order.
fn wanted(config: &ModelConfig) -> Vec<Wanted> {
    let arch = config.architecture;
    let (hidden, ffn, vocab) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let q_rows = config.num_heads * config.head_dim;
    let kv_rows = config.num_kv_heads * config.head_dim;
    let permuted = |heads: u64| arch.permutes_qk().then_some(heads);
    let mut out = vec![want(
        "token_embd.weight",
        "model.embed_tokens.weight",
        &[vocab, hidden],
    )];
    for n in 0..config.num_layers {
        let g = |s: &str| format!("blk.{n}.{s}");
        let h = |s: &str| format!("model.layers.{n}.{s}");
        let mut layer = vec![
            want(
                &g("attn_norm.weight"),
                &h("input_layernorm.weight"),
                &[hidden],
            ),
            Wanted {
                unpermute_heads: permuted(config.num_heads),
                ..want(
                    &g("attn_q.weight"),
                    &h("self_attn.q_proj.weight"),
                    &[q_rows, hidden],
                )
            },
            Wanted {
                unpermute_heads: permuted(config.num_kv_heads),
                ..want(
                    &g("attn_k.weight"),
                    &h("self_attn.k_proj.weight"),
                    &[kv_rows, hidden],
                )
            },
            want(
                &g("attn_v.weight"),
                &h("self_attn.v_proj.weight"),
                &[kv_rows, hidden],
            ),
        ];
        if arch.qkv_bias() {
            layer.extend([
                want(&g("attn_q.bias"), &h("self_attn.q_proj.bias"), &[q_rows]),
                want(&g("attn_k.bias"), &h("self_attn.k_proj.bias"), &[kv_rows]),
                want(&g("attn_v.bias"), &h("self_attn.v_proj.bias"), &[kv_rows]),
            ]);
        }
        layer.extend([
            want(
                &g("attn_output.weight"),
                &h("self_attn.o_proj.weight"),
                &[hidden, q_rows],
            ),
            want(
                &g("ffn_norm.weight"),
                &h("post_attention_layernorm.weight"),
                &[hidden],
            ),
            want(
                &g("ffn_gate.weight"),
                &h("mlp.gate_proj.weight"),
                &[ffn, hidden],
            ),
            want(
                &g("ffn_up.weight"),
                &h("mlp.up_proj.weight"),
                &[ffn, hidden],
            ),
            want(
                &g("ffn_down.weight"),
                &h("mlp.down_proj.weight"),
                &[hidden, ffn],
            ),
        ]);
        out.extend(layer);
    }
    out.push(want("output_norm.weight", "model.norm.weight", &[hidden]));
    if !config.tie_word_embeddings {
        out.push(want("output.weight", "lm_head.weight", &[vocab, hidden]));
    }
    out
}

/// Matches a file's tensors to the weights of `config`: each one present, of the right shape
/// and a dequantizable type, and no tensor left over.
pub fn plan<'a>(config: &ModelConfig, tensors: &'a [TensorInfo]) -> Result<Vec<TensorPlan<'a>>> {
    let arch = config.architecture.model_type();
    let mut by_name: HashMap<&str, &TensorInfo> =
        tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut plans = Vec::new();
    for w in wanted(config) {
        let source = by_name
            .remove(w.gguf.as_str())
            .ok_or_else(|| Error::MissingTensor {
                tensor: w.gguf.clone(),
                arch: arch.to_owned(),
            })?;
        if source.shape() != w.shape {
            return Err(Error::TensorShape {
                tensor: w.gguf,
                expected: w.shape,
                found: source.shape(),
            });
        }
        check_dequantizable(source)?;
        plans.push(TensorPlan {
            hf_name: w.hf,
            source,
            shape: w.shape,
            unpermute_heads: w.unpermute_heads,
        });
    }
    if let Some(left) = tensors
        .iter()
        .find(|t| by_name.contains_key(t.name.as_str()))
    {
        return Err(leftover(left, arch));
    }
    Ok(plans)
}

/// The error for a tensor the model has no place for.
fn leftover(tensor: &TensorInfo, arch: &str) -> Error {
    if tensor.name == "rope_freqs.weight" {
        // llama.cpp's per-dimension rope factors (Llama 3.1 scaling); transformers drops them,
        // which would change the model.
        return Error::Unsupported {
            what: "rope_freqs.weight (per-dimension rope frequency factors, as in Llama 3.1 files)"
                .to_owned(),
        };
    }
    Error::UnexpectedTensor {
        tensor: tensor.name.clone(),
        arch: arch.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llama.cpp's `permute` (`convert_hf_to_gguf.py`) on row indices: HF rows reshaped to
    /// `(heads, 2, half)`, axes 1 and 2 swapped, flattened. GGUF row `g` is `(h, j, i)` in the
    /// swapped order and holds HF row `(h, i, j)`.
    fn llama_cpp_permute(hf_rows: &[u64], head_dim: u64) -> Vec<u64> {
        let half = head_dim / 2;
        (0..hf_rows.len() as u64)
            .map(|g| {
                let (h, rest) = (g / head_dim, g % head_dim);
                let (j, i) = (rest / 2, rest % 2);
                hf_rows[(h * head_dim + i * half + j) as usize]
            })
            .collect()
    }

    #[test]
    fn interleaved_rows_are_put_back() {
        // Two heads of 6 rows: GGUF holds a0 b0 a1 b1 a2 b2 per head (a, b the halves).
        let hf: Vec<u64> = (0..12).collect();
        let gguf = llama_cpp_permute(&hf, 6);
        assert_eq!(gguf, [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]);
        for r in 0..12 {
            assert_eq!(gguf[interleaved_row(r, 6) as usize], hf[r as usize]);
        }
    }
}
