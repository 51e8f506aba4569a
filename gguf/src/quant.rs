//! Dequantization of ggml blocks to f32, bit for bit what gguf-py's `gguf.quants.dequantize`
//! gives (and so what transformers loads a GGUF file as).
//!
//! gguf-py computes in f32 after widening the f16 scales, one rounding per numpy operation;
//! each formula here does the same operations in the same order (`d * q + m`, never a fused
//! multiply-add). Layouts, per block (`d`, `m`, `dmin` are f16, `qs` packed quants):
//!
//! | type | elements | bytes | layout | value |
//! |------|----------|-------|--------|-------|
//! | Q8_0 | 32  | 34  | d, 32 x i8 | `q * d` |
//! | Q4_0 | 32  | 18  | d, 16 bytes of nibbles | `d * (q - 8)` |
//! | Q4_1 | 32  | 20  | d, m, 16 bytes of nibbles | `d * q + m` |
//! | Q5_0 | 32  | 22  | d, 32 high bits (u32), nibbles | `d * (q - 16)` |
//! | Q5_1 | 32  | 24  | d, m, 32 high bits, nibbles | `d * q + m` |
//! | Q4_K | 256 | 144 | d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles | `(d * sc) * q - dmin * mn` |
//! | Q5_K | 256 | 176 | as Q4_K, then 32 bytes of high bits before the nibbles | as Q4_K |
//! | Q6_K | 256 | 210 | 128 bytes low nibbles, 64 bytes high 2 bits, 16 x i8 scales, d | `(d * sc) * (q - 32)` |
//!
//! In the 32-element types, element `j < 16` is the low nibble of byte `j` and element
//! `j + 16` its high nibble.

use half::{bf16, f16};

use crate::ggml_type::{GgmlType, DEQUANTIZABLE, QK_K};
use crate::{Error, Result};

/// Appends the values of `bytes`, whole blocks of `ggml_type`, to `out`.
pub fn dequantize_into(ggml_type: GgmlType, bytes: &[u8], out: &mut Vec<f32>) -> Result<()> {
    let type_size = ggml_type.type_size();
    if !bytes.len().is_multiple_of(type_size) {
        return Err(Error::PartialBlock {
            ggml_type,
            len: bytes.len(),
            type_size,
        });
    }
    out.reserve(bytes.len() / type_size * ggml_type.block_size());
    match ggml_type {
        GgmlType::F32 => out.extend(blocks::<4>(bytes).iter().map(|b| f32::from_le_bytes(*b))),
        GgmlType::F16 => out.extend(blocks::<2>(bytes).iter().map(|b| half(*b))),
        GgmlType::BF16 => out.extend(
            blocks::<2>(bytes)
                .iter()
                .map(|b| bf16::from_le_bytes(*b).to_f32()),
        ),
        GgmlType::Q8_0 => blocks(bytes).iter().for_each(|b| q8_0(b, out)),
        GgmlType::Q4_0 => blocks(bytes).iter().for_each(|b| q4_0(b, out)),
        GgmlType::Q4_1 => blocks(bytes).iter().for_each(|b| q4_1(b, out)),
        GgmlType::Q5_0 => blocks(bytes).iter().for_each(|b| q5_0(b, out)),
        GgmlType::Q5_1 => blocks(bytes).iter().for_each(|b| q5_1(b, out)),
        GgmlType::Q4_K => blocks(bytes).iter().for_each(|b| q4_k(b, out)),
        GgmlType::Q5_K => blocks(bytes).iter().for_each(|b| q5_k(b, out)),
        GgmlType::Q6_K => blocks(bytes).iter().for_each(|b| q6_k(b, out)),
        other => {
            return Err(Error::NotDequantizable {
                ggml_type: other,
                supported: supported_list(),
            })
        }
    }
    Ok(())
}

/// The dequantizable types, for messages: `F32, F16, ...`.
pub fn supported_list() -> String {
    DEQUANTIZABLE.map(|t| t.to_string()).join(", ")
}

/// `bytes` as blocks of `N` bytes (a whole number of them: checked by the caller).
fn blocks<const N: usize>(bytes: &[u8]) -> &[[u8; N]] {
    bytes.as_chunks::<N>().0
}

/// An f16 widened to f32 (exact).
fn half(b: [u8; 2]) -> f32 {
    f16::from_le_bytes(b).to_f32()
}

/// The f16 at bytes `at..at + 2` of a block.
fn half_at<const N: usize>(block: &[u8; N], at: usize) -> f32 {
    half([block[at], block[at + 1]])
}

fn q8_0(b: &[u8; 34], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(b[2..].iter().map(|&q| f32::from(q as i8) * d));
}

/// The 32 4-bit quants of a 16-byte nibble array: low nibbles, then high nibbles.
fn nibbles(qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let low = qs.iter().map(|q| q & 0x0F);
    let high = qs.iter().map(|q| q >> 4);
    low.chain(high)
}

fn q4_0(b: &[u8; 18], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    out.extend(nibbles(&b[2..]).map(|q| d * f32::from(q as i8 - 8)));
}

fn q4_1(b: &[u8; 20], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    out.extend(nibbles(&b[4..]).map(|q| d * f32::from(q) + m));
}

/// The 32 5-bit quants: nibbles plus bit `j` of the little-endian u32 `qh` as bit 4.
fn five_bit(qh: [u8; 4], qs: &[u8]) -> impl Iterator<Item = u8> + '_ {
    let qh = u32::from_le_bytes(qh);
    nibbles(qs)
        .enumerate()
        .map(move |(j, q)| q | ((((qh >> j) & 1) as u8) << 4))
}

fn q5_0(b: &[u8; 22], out: &mut Vec<f32>) {
    let d = half_at(b, 0);
    let qh = [b[2], b[3], b[4], b[5]];
    out.extend(five_bit(qh, &b[6..]).map(|q| d * f32::from(q as i8 - 16)));
}

fn q5_1(b: &[u8; 24], out: &mut Vec<f32>) {
    let (d, m) = (half_at(b, 0), half_at(b, 2));
    let qh = [b[4], b[5], b[6], b[7]];
    out.extend(five_bit(qh, &b[8..]).map(|q| d * f32::from(q) + m));
}

/// The 8 6-bit scales and 8 6-bit mins of a Q4_K/Q5_K block, packed in 12 bytes: bytes 0..4
/// hold scales 0..4 (low 6 bits) and the top 2 bits of scales 4..8; bytes 4..8 the same for
/// the mins; bytes 8..12 the low 4 bits of scales 4..8 (low nibble) and mins 4..8 (high).
fn k_scales(s: &[u8; 12]) -> ([u8; 8], [u8; 8]) {
    let mut scale = [0u8; 8];
    let mut min = [0u8; 8];
    for j in 0..4 {
        scale[j] = s[j] & 0x3F;
        min[j] = s[4 + j] & 0x3F;
        scale[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        min[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (scale, min)
}

/// Q4_K and Q5_K: sub-block `k` (32 elements) is `(d * scale[k]) * q - dmin * min[k]`, with
/// `q` the nibble of byte `32 * (k / 2) + l` (low for even `k`), plus for Q5_K bit `k` of
/// high-bit byte `l` as bit 4.
fn k_quant(head: &[u8; 16], qh: Option<&[u8]>, qs: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (half_at(head, 0), half_at(head, 2));
    let mut s = [0u8; 12];
    s.copy_from_slice(&head[4..16]);
    let (scale, min) = k_scales(&s);
    for k in 0..8 {
        let sub_d = d * f32::from(scale[k]);
        let sub_m = dmin * f32::from(min[k]);
        let bytes = &qs[32 * (k / 2)..32 * (k / 2) + 32];
        let shift = 4 * (k % 2);
        for (l, &byte) in bytes.iter().enumerate() {
            let high = qh.map_or(0, |qh| ((qh[l] >> k) & 1) << 4);
            let q = ((byte >> shift) & 0x0F) | high;
            out.push(sub_d * f32::from(q) - sub_m);
        }
    }
}

fn q4_k(b: &[u8; 144], out: &mut Vec<f32>) {
    let mut head = [0u8; 16];
    head.copy_from_slice(&b[..16]);
    k_quant(&head, None, &b[16..], out);
}

fn q5_k(b: &[u8; 176], out: &mut Vec<f32>) {
    let mut head = [0u8; 16];
    head.copy_from_slice(&b[..16]);
    k_quant(&head, Some(&b[16..48]), &b[48..], out);
}

/// Q6_K: element `p` (of 256) in half `h = p / 128`, at `r = p % 128`, takes its low 4 bits
/// from byte `64 h + r % 64` of `ql` (low nibble for `r < 64`), its high 2 bits from bits
/// `2 (r / 32)` of byte `32 h + r % 32` of `qh`; the sixteen groups of 16 have an i8 scale.
fn q6_k(b: &[u8; 210], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
    let d = half_at(b, 208);
    for p in 0..QK_K {
        let (h, r) = (p / 128, p % 128);
        let low = (ql[64 * h + r % 64] >> (4 * (r / 64))) & 0x0F;
        let high = (qh[32 * h + r % 32] >> (2 * (r / 32))) & 0x03;
        let q = (low | (high << 4)) as i8 - 32;
        let sub_d = d * f32::from(scales[p / 16] as i8);
        out.push(sub_d * f32::from(q));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deq(ty: GgmlType, bytes: &[u8]) -> Vec<f32> {
        let mut out = Vec::new();
        dequantize_into(ty, bytes, &mut out).expect("dequantize");
        out
    }

    const ONE: [u8; 2] = [0x00, 0x3C]; // f16 1.0
    const HALF: [u8; 2] = [0x00, 0x38]; // f16 0.5

    #[test]
    fn plain_types_widen_exactly() {
        assert_eq!(deq(GgmlType::F32, &1.5f32.to_le_bytes()), [1.5]);
        assert_eq!(deq(GgmlType::F16, &[ONE, HALF].concat()), [1.0, 0.5]);
        // bf16 0x3FC0 is 1.5
        assert_eq!(deq(GgmlType::BF16, &[0xC0, 0x3F]), [1.5]);
    }

    #[test]
    fn q8_0_scales_signed_bytes() {
        let mut block = vec![HALF[0], HALF[1]];
        block.extend((0..32).map(|i| (i as i8 - 16) as u8));
        let want: Vec<f32> = (0..32).map(|i| (i - 16) as f32 * 0.5).collect();
        assert_eq!(deq(GgmlType::Q8_0, &block), want);
    }

    #[test]
    fn q4_0_and_q4_1_split_nibbles_low_then_high() {
        // byte j = (high j, low 15 - j) -> element j is 15 - j, element j + 16 is j.
        let qs: Vec<u8> = (0..16u8).map(|j| (j << 4) | (15 - j)).collect();
        let q: Vec<f32> = (0..16)
            .map(|j| (15 - j) as f32)
            .chain((0..16).map(|j| j as f32))
            .collect();
        let b0 = [&ONE[..], &qs].concat();
        let want: Vec<f32> = q.iter().map(|v| v - 8.0).collect();
        assert_eq!(deq(GgmlType::Q4_0, &b0), want);
        let b1 = [&HALF[..], &ONE[..], &qs].concat();
        let want: Vec<f32> = q.iter().map(|v| 0.5 * v + 1.0).collect();
        assert_eq!(deq(GgmlType::Q4_1, &b1), want);
    }

    #[test]
    fn q5_takes_bit_four_from_the_high_word() {
        // All nibbles 0; qh has bit j set for odd j: element j is 16 for odd j, else 0.
        let qh = 0xAAAA_AAAAu32.to_le_bytes();
        let b = [&ONE[..], &qh, &[0u8; 16]].concat();
        let want: Vec<f32> = (0..32)
            .map(|j| if j % 2 == 1 { 0.0 } else { -16.0 })
            .collect();
        assert_eq!(deq(GgmlType::Q5_0, &b), want);
        let b = [&ONE[..], &ONE[..], &qh, &[0u8; 16]].concat();
        let want: Vec<f32> = (0..32)
            .map(|j| if j % 2 == 1 { 17.0 } else { 1.0 })
            .collect();
        assert_eq!(deq(GgmlType::Q5_1, &b), want);
    }

    #[test]
    fn k_scales_unpack_six_bits() {
        let s = [1, 2, 3, 0xC4, 5, 6, 7, 0x48, 0x21, 0x43, 0x65, 0x87];
        let (scale, min) = k_scales(&s);
        assert_eq!(scale, [1, 2, 3, 4, 1, 3, 5, 7 | 0x30]);
        assert_eq!(min, [5, 6, 7, 8, 2, 4, 6, 8 | 0x10]);
    }

    #[test]
    fn q6_k_centres_six_bit_quants() {
        // ql, qh all zero -> q = -32; scale k = k + 1; d = 1.
        let mut b = vec![0u8; 210];
        for k in 0..16 {
            b[192 + k] = k as u8 + 1;
        }
        b[208..210].copy_from_slice(&ONE);
        let want: Vec<f32> = (0..256).map(|p| -32.0 * (p / 16 + 1) as f32).collect();
        assert_eq!(deq(GgmlType::Q6_K, &b), want);
    }

    #[test]
    fn partial_blocks_and_other_types_are_refused() {
        let mut out = Vec::new();
        let err = dequantize_into(GgmlType::Q8_0, &[0; 35], &mut out).expect_err("partial");
        assert_eq!(
            err.to_string(),
            "Q8_0 data of 35 bytes is not a whole number of 34-byte blocks"
        );
        let err = dequantize_into(GgmlType::Q2_K, &[0; 84], &mut out).expect_err("Q2_K");
        assert_eq!(
            err.to_string(),
            "Q2_K cannot be dequantized (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)"
        );
        assert!(out.is_empty());
    }
}
