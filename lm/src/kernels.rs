//! Decoding-sized CPU kernels in plain Rust: the RMS norm, the gated SiLU, and one decoding
//! step of attention (rotary positions, the cache write and the attention itself in one
//! pass). At batch 1 a token cost about 1,700 small libtorch ops, and a third of the time
//! went to their dispatch while the second core waited; these replace most of them. They
//! take decoding steps in float32 on the CPU ([`applies`]); anything else keeps the libtorch
//! ops, which are also the reference the tests check these against.

use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The most rows a kernel takes: decoding batches, whose small ops cost more to dispatch
/// than to run.
pub(crate) const MAX_ROWS: usize = 64;

/// Whether the kernels take `x` (with `params` beside it): a decoding step, one position per
/// row (`[batch, 1, features]` or `[batch, features]`, at most [`MAX_ROWS`] rows), float32 on
/// the CPU, contiguous, with no gradient wanted. Prompts keep libtorch's ops, which are
/// threaded and give transformers' results to the bit.
pub(crate) fn applies(x: &Tensor, params: &[&Tensor]) -> bool {
    let plain = |t: &Tensor| {
        t.device() == Device::Cpu
            && t.kind() == Kind::Float
            && t.is_contiguous()
            && !t.requires_grad()
    };
    let decoding = match x.size()[..] {
        [batch, 1, _] | [batch, _] => batch as usize <= MAX_ROWS,
        _ => false,
    };
    decoding && plain(x) && params.iter().all(|p| plain(p))
}

/// The elements of a contiguous float32 CPU tensor.
#[allow(unsafe_code)]
fn floats(t: &Tensor) -> Result<&[f32]> {
    check(t, Kind::Float)?;
    if t.numel() == 0 {
        return Ok(&[]);
    }
    // SAFETY: `check` found a defined, contiguous float32 tensor on the CPU, so `data_ptr`
    // (which includes the storage offset) points at `numel` initialized, aligned f32s that
    // live at least as long as the borrow of `t`. The kernels write only to tensors they
    // created or hold mutably, never to storage that a live slice from here reads.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, t.numel()) })
}

/// The elements of a contiguous float32 CPU tensor, to write.
#[allow(unsafe_code)]
fn floats_mut(t: &mut Tensor) -> Result<&mut [f32]> {
    check(t, Kind::Float)?;
    if t.numel() == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `floats`; the mutable borrow of `t` keeps this module from reading the
    // same tensor while the slice lives.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, t.numel()) })
}

/// The elements of a contiguous boolean CPU tensor, as bytes (0 or 1).
#[allow(unsafe_code)]
fn flags(t: &Tensor) -> Result<&[u8]> {
    check(t, Kind::Bool)?;
    if t.numel() == 0 {
        return Ok(&[]);
    }
    // SAFETY: as in `floats`; libtorch stores a bool as one byte, 0 or 1.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, t.numel()) })
}

fn check(t: &Tensor, kind: Kind) -> Result<()> {
    if t.defined() && t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() {
        Ok(())
    } else {
        Err(Error::Kernel(format!(
            "expected a contiguous {kind:?} CPU tensor, got {:?} on {:?}",
            t.kind(),
            t.device()
        )))
    }
}

/// Sum of squares with 16 independent lanes (so that it vectorizes).
fn sum_squares(x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v * v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `a . b` with 16 independent lanes.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((l, x), y) in lanes.iter_mut().zip(x).zip(y) {
            *l += x * y;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Llama's RMS norm of each row of `x` `[.., hidden]`: `w * (x / sqrt(mean(x^2) + eps))`.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let w = floats(weight)?;
    let mut out = Tensor::f_empty(x.size(), (Kind::Float, Device::Cpu))?;
    let o = floats_mut(&mut out)?;
    for (row, o) in floats(x)?
        .chunks_exact(w.len())
        .zip(o.chunks_exact_mut(w.len()))
    {
        let variance = sum_squares(row) / w.len() as f32;
        let inv = 1.0 / (variance + eps as f32).sqrt();
        for ((o, x), w) in o.iter_mut().zip(row).zip(w) {
            *o = w * (x * inv);
        }
    }
    Ok(out)
}

/// `silu(gate) * up` of `both` `[.., 2 inter]` = `[gate | up]`: `[.., inter]`.
pub(crate) fn silu_mul(both: &Tensor) -> Result<Tensor> {
    let mut size = both.size();
    let inter = size.last().copied().unwrap_or(0) / 2;
    if let Some(last) = size.last_mut() {
        *last = inter;
    }
    let inter = inter as usize;
    let mut out = Tensor::f_empty(size, (Kind::Float, Device::Cpu))?;
    let o = floats_mut(&mut out)?;
    for (row, o) in floats(both)?
        .chunks_exact(2 * inter)
        .zip(o.chunks_exact_mut(inter))
    {
        let (gate, up) = row.split_at(inter);
        for ((o, g), u) in o.iter_mut().zip(gate).zip(up) {
            *o = u * (g / (1.0 + (-g).exp()));
        }
    }
    Ok(out)
}

/// Head counts of one decoding step of attention.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeHeads {
    pub(crate) heads: usize,
    pub(crate) kv_heads: usize,
    pub(crate) head_dim: usize,
    /// Multiplies the scores before the softmax.
    pub(crate) scale: f32,
}

/// `x * cos + rotate_half(x) * sin` into `out`.
fn rotate(x: &[f32], cos: &[f32], sin: &[f32], out: &mut [f32]) {
    let half = x.len() / 2;
    for i in 0..x.len() {
        let rotated = if i < half { -x[i + half] } else { x[i - half] };
        out[i] = x[i] * cos[i] + rotated * sin[i];
    }
}

/// One decoding step of attention for every row: the new token's queries, keys and values
/// `qkv` `[batch, 1, (heads + 2 kv_heads) head_dim]` (`[q | k | v]`); rotates its queries and
/// keys by `cos`, `sin` `[batch, 1, 1, head_dim]`, writes its key and value at position
/// `start` of the layer's cache `keys`, `values` `[batch, kv_heads, capacity, head_dim]`, and
/// attends over positions `0..=start`, those `allowed` (`[batch | 1, 1, 1, start + 1]`;
/// none: all). Returns `[batch, 1, heads head_dim]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn decode_attention(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    keys: &mut Tensor,
    values: &mut Tensor,
    start: usize,
    allowed: Option<&Tensor>,
    h: DecodeHeads,
) -> Result<Tensor> {
    let (n, kv, d) = (h.heads, h.kv_heads, h.head_dim);
    let batch = qkv.size()[0] as usize;
    let capacity = keys.size().get(2).copied().unwrap_or(0) as usize;
    let width = (n + 2 * kv) * d;
    let positions = start + 1;
    let shape_error = Error::Kernel(format!(
        "decode attention: qkv {:?}, cos {:?}, cache {:?}, start {start}",
        qkv.size(),
        cos.size(),
        keys.size()
    ));
    let qkv = floats(qkv)?;
    let (cos, sin) = (floats(cos)?, floats(sin)?);
    let allowed = allowed.map(flags).transpose()?;
    if kv == 0
        || n % kv != 0
        || qkv.len() != batch * width
        || cos.len() != batch * d
        || sin.len() != batch * d
        || positions > capacity
        || keys.numel() != batch * kv * capacity * d
        || values.size() != keys.size()
        || allowed.is_some_and(|a| a.len() != positions && a.len() != batch * positions)
    {
        return Err(shape_error);
    }
    let mut out = Tensor::f_empty(
        [batch as i64, 1, (n * d) as i64],
        (Kind::Float, Device::Cpu),
    )?;
    let o = floats_mut(&mut out)?;
    let (ks, vs) = (floats_mut(keys)?, floats_mut(values)?);
    let mut q = vec![0f32; d];
    let mut scores = vec![0f32; positions];
    let group = n / kv;
    for r in 0..batch {
        let row = &qkv[r * width..(r + 1) * width];
        let (cos, sin) = (&cos[r * d..(r + 1) * d], &sin[r * d..(r + 1) * d]);
        // The start of position `p` of kv head `g` in this row's cache.
        let at = |g: usize, p: usize| ((r * kv + g) * capacity + p) * d;
        for g in 0..kv {
            let slot = at(g, start);
            rotate(&row[(n + g) * d..][..d], cos, sin, &mut ks[slot..slot + d]);
            vs[slot..slot + d].copy_from_slice(&row[(n + kv + g) * d..][..d]);
        }
        let allowed = allowed.map(|a| {
            if a.len() == positions {
                a
            } else {
                &a[r * positions..(r + 1) * positions]
            }
        });
        for head in 0..n {
            let g = head / group;
            rotate(&row[head * d..][..d], cos, sin, &mut q);
            let mut max = f32::NEG_INFINITY;
            for (p, s) in scores.iter_mut().enumerate() {
                *s = if allowed.is_none_or(|a| a[p] != 0) {
                    dot(&q, &ks[at(g, p)..at(g, p) + d]) * h.scale
                } else {
                    f32::NEG_INFINITY
                };
                max = max.max(*s);
            }
            let mut total = 0f32;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                total += *s;
            }
            let o = &mut o[(r * n + head) * d..(r * n + head + 1) * d];
            o.fill(0.0);
            for (p, s) in scores.iter().enumerate() {
                if *s != 0.0 {
                    let weight = s / total;
                    for (o, v) in o.iter_mut().zip(&vs[at(g, p)..at(g, p) + d]) {
                        *o += weight * v;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rope::apply_rotary;

    fn randn(size: &[i64]) -> Tensor {
        Tensor::randn(size, (Kind::Float, Device::Cpu))
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        f64::try_from((a - b).abs().max()).expect("scalar")
    }

    #[test]
    fn rms_norm_matches_the_libtorch_ops() -> Result<()> {
        tch::manual_seed(0);
        let (x, w) = (randn(&[3, 1, 40]) * 3.0, randn(&[40]));
        let eps = 1e-5;
        let variance = x.square().mean_dim(-1, true, Kind::Float);
        let want = &w * (&x * (variance + eps).rsqrt());
        assert!(max_diff(&rms_norm(&x, &w, eps)?, &want) < 1e-5);
        Ok(())
    }

    #[test]
    fn silu_mul_matches_the_libtorch_ops() -> Result<()> {
        tch::manual_seed(1);
        let both = randn(&[2, 1, 2 * 37]) * 4.0;
        let want = both.narrow(-1, 0, 37).silu() * both.narrow(-1, 37, 37);
        assert!(max_diff(&silu_mul(&both)?, &want) < 1e-6);
        Ok(())
    }

    /// The kernel against rotary + libtorch's attention over the cache with the new key and
    /// value appended, for grouped heads, with no mask, a shared mask and per-row masks.
    #[test]
    fn decode_attention_matches_rotary_and_sdpa() -> Result<()> {
        tch::manual_seed(2);
        let (batch, n, kv, d, capacity, start) = (3i64, 6i64, 2i64, 20i64, 9i64, 5i64);
        let heads = DecodeHeads {
            heads: n as usize,
            kv_heads: kv as usize,
            head_dim: d as usize,
            scale: 0.3,
        };
        let qkv = randn(&[batch, 1, (n + 2 * kv) * d]);
        let angles = randn(&[batch, 1, 1, d / 2]).repeat([1, 1, 1, 2]);
        let (cos, sin) = (angles.cos(), angles.sin());
        let cached = (
            randn(&[batch, kv, capacity, d]),
            randn(&[batch, kv, capacity, d]),
        );
        // Row 0 sees everything, row 1 not position 1, row 2 only positions 3 and up.
        let per_row = Tensor::from_slice(&[
            true, true, true, true, true, true, true, false, true, true, true, true, false, false,
            false, true, true, true,
        ])
        .view([batch, 1, 1, start + 1]);
        let shared = Tensor::from_slice(&[false, true, true, true, true, true]).view([1, 1, 1, 6]);
        for mask in [None, Some(&shared), Some(&per_row)] {
            let (mut keys, mut values) = (cached.0.copy(), cached.1.copy());
            let got = decode_attention(
                &qkv,
                &cos,
                &sin,
                &mut keys,
                &mut values,
                start as usize,
                mask,
                heads,
            )?;
            // [batch, heads, 1, head_dim]
            let split = |from: i64, h: i64| {
                qkv.narrow(-1, from * d, h * d)
                    .view([batch, 1, h, d])
                    .transpose(1, 2)
            };
            let q = apply_rotary(&split(0, n), &cos, &sin)?;
            let k = apply_rotary(&split(n, kv), &cos, &sin)?;
            let v = split(n + kv, kv);
            let (want_keys, want_values) = (cached.0.copy(), cached.1.copy());
            want_keys.narrow(2, start, 1).copy_(&k);
            want_values.narrow(2, start, 1).copy_(&v);
            assert!(
                max_diff(&keys, &want_keys) < 1e-6,
                "the new key, and nothing else"
            );
            assert!(
                max_diff(&values, &want_values) == 0.0,
                "the new value, and nothing else"
            );
            let want = Tensor::scaled_dot_product_attention(
                &q,
                &want_keys.narrow(2, 0, start + 1),
                &want_values.narrow(2, 0, start + 1),
                mask,
                0.0,
                false,
                0.3,
                true,
            )
            .transpose(1, 2)
            .reshape([batch, 1, n * d]);
            assert!(max_diff(&got, &want) < 1e-5, "{}", max_diff(&got, &want));
        }
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        let qkv = randn(&[1, 1, 10 * 4]);
        let table = randn(&[1, 1, 1, 4]);
        let (mut keys, mut values) = (randn(&[1, 2, 3, 4]), randn(&[1, 2, 3, 4]));
        let heads = DecodeHeads {
            heads: 6,
            kv_heads: 2,
            head_dim: 4,
            scale: 1.0,
        };
        // Position 3 is past the capacity of 3.
        let out = decode_attention(&qkv, &table, &table, &mut keys, &mut values, 3, None, heads);
        assert!(matches!(out, Err(Error::Kernel(_))));
        let out = decode_attention(&qkv, &table, &table, &mut keys, &mut values, 2, None, heads);
        assert!(out.is_ok());
    }

    #[test]
    fn only_plain_decoding_sized_float_tensors_apply() {
        let x = randn(&[2, 1, 8]);
        assert!(applies(&x, &[&randn(&[8])]));
        assert!(applies(&randn(&[2, 8]), &[]));
        assert!(!applies(&randn(&[65, 8]), &[]), "too many rows");
        assert!(!applies(&randn(&[1, 2, 8]), &[]), "a prompt");
        assert!(!applies(&x.to_kind(Kind::BFloat16), &[]));
        assert!(!applies(&randn(&[8, 2]).tr(), &[]), "not contiguous");
        assert!(!applies(&x, &[&randn(&[8]).set_requires_grad(true)]));
    }
}
