//! AVX-512 bodies of [`crate::kernels`]' decoding kernels: sixteen float32 lanes at a time,
//! with exponentials by a polynomial instead of one `expf` call per element.
//!
//! [`head`], one row's decoding attention for one kv head for head dimensions of 16 C (64,
//! 128, 256), keeps the queries and the running sums in registers. It replaced
//! [`crate::kernels`]' portable body on these CPUs, where a dot product of 64 ended in its
//! own horizontal sum and a softmax in one `expf` call per score. In a scratch loop over `decode_attention` at a SmolLM2 layer's shapes (batch 8,
//! 64 positions) one call took 111 us in bfloat16 before, 24-27 us with this body and the
//! vectorized rotary and rounding of `kernels`; float32 72 us before, 20-23 us after.

#![cfg(target_arch = "x86_64")]
#![allow(unsafe_code)]

use std::arch::x86_64::*;

use tch::Kind;

use crate::kernels::{Element, Head};

/// Sixteen elements of `x` from `at` in float32 (bfloat16: its bits shifted up).
///
/// # Safety
/// `at + 16 <= x.len()`; the CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load16<T: Element>(x: &[T], at: usize) -> __m512 {
    debug_assert!(at + 16 <= x.len());
    // SAFETY: the caller keeps the sixteen elements inside `x`.
    unsafe {
        let p = x.as_ptr().add(at);
        if matches!(T::KIND, Kind::BFloat16) {
            let bits = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bits)))
        } else {
            _mm512_loadu_ps(p as *const f32)
        }
    }
}

/// Sixteen float32 lanes rounded to bfloat16 as [`Element::put`] rounds (to nearest even;
/// a NaN kept, made quiet), as float32 bits (the low sixteen zero).
#[inline]
#[target_feature(enable = "avx512f")]
fn round_bf16(x: __m512) -> __m512i {
    let bits = _mm512_castps_si512(x);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let up = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb);
    let high = _mm512_set1_epi32(0xffff_0000_u32 as i32);
    let rounded = _mm512_and_si512(_mm512_add_epi32(bits, up), high);
    let quiet = _mm512_and_si512(_mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)), high);
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
    _mm512_mask_mov_epi32(rounded, nan, quiet)
}

/// `x` rounded to `T` and back to float32.
#[inline]
#[target_feature(enable = "avx512f")]
fn round<T: Element>(x: __m512) -> __m512 {
    if matches!(T::KIND, Kind::BFloat16) {
        _mm512_castsi512_ps(round_bf16(x))
    } else {
        x
    }
}

/// Stores sixteen lanes into `x` from `at`, rounded to `T`.
///
/// # Safety
/// `at + 16 <= x.len()`; the CPU has AVX-512F.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store16<T: Element>(x: &mut [T], at: usize, v: __m512) {
    debug_assert!(at + 16 <= x.len());
    // SAFETY: the caller keeps the sixteen elements inside `x`.
    unsafe {
        let p = x.as_mut_ptr().add(at);
        if matches!(T::KIND, Kind::BFloat16) {
            let halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(round_bf16(v)));
            _mm256_storeu_si256(p as *mut __m256i, halves);
        } else {
            _mm512_storeu_ps(p as *mut f32, v);
        }
    }
}

/// `silu(gate) * up` into `out`, elementwise, rounded as [`crate::kernels`]' portable body
/// rounds: `put(up * put(g / (1 + exp(-g))))`, for the whole sixteens of the three slices'
/// one length; returns how many elements it did (the caller does the rest).
///
/// # Safety
/// The CPU has AVX-512F.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn silu_mul_row<T: Element>(gate: &[T], up: &[T], out: &mut [T]) -> usize {
    let n = out.len();
    assert!(gate.len() == n && up.len() == n);
    let full = n / 16 * 16;
    for at in (0..full).step_by(16) {
        // SAFETY: `at + 16 <= full <= n`, inside all three slices.
        unsafe {
            let g = load16(gate, at);
            let e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            let silu = round::<T>(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0), e)));
            store16(out, at, _mm512_mul_ps(load16(up, at), silu));
        }
    }
    full
}

/// `exp(x)` of sixteen lanes: Cephes' `expf` (a degree-6 polynomial after taking out the
/// power of two; about one unit in the last place), 0 below -87.3 (where `expf` reaches
/// float32's smallest normal), NaN kept.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp16(x: __m512) -> __m512 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts, the first exact in few bits, so that `x - n ln 2` loses nothing.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5, // Cephes: 5.0000001201e-1, which float32 rounds to 0.5
    ];
    // max(-88, x) keeps a NaN `x` (the second operand is returned when one is NaN).
    let clamped = _mm512_max_ps(_mm512_set1_ps(-88.0), x);
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
        _mm512_mul_ps(clamped, _mm512_set1_ps(LOG2E)),
    );
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), clamped);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
    let mut p = _mm512_set1_ps(P[0]);
    for c in &P[1..] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
    }
    let r2 = _mm512_mul_ps(r, r);
    let y = _mm512_add_ps(_mm512_fmadd_ps(p, r2, r), _mm512_set1_ps(1.0));
    let y = _mm512_scalef_ps(y, n);
    let tiny = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_set1_ps(-87.3));
    _mm512_mask_mov_ps(y, tiny, _mm512_setzero_ps())
}

/// The sums of the sixteen lanes of each of `a`, in order: two rounds of pairing inside
/// 128-bit lanes, then the four 128-bit lanes added.
#[inline]
#[target_feature(enable = "avx512f")]
fn sum4(a: [__m512; 4]) -> __m128 {
    // [a0_0 + a0_2, a1_0 + a1_2, a0_1 + a0_3, a1_1 + a1_3] in each 128-bit lane; a2, a3 alike.
    let ab = _mm512_add_ps(
        _mm512_unpacklo_ps(a[0], a[1]),
        _mm512_unpackhi_ps(a[0], a[1]),
    );
    let cd = _mm512_add_ps(
        _mm512_unpacklo_ps(a[2], a[3]),
        _mm512_unpackhi_ps(a[2], a[3]),
    );
    // [a0, a1, a2, a3] partial sums in each 128-bit lane.
    let (ab, cd) = (_mm512_castps_pd(ab), _mm512_castps_pd(cd));
    let all = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(ab, cd)),
        _mm512_castpd_ps(_mm512_unpackhi_pd(ab, cd)),
    );
    let half = _mm256_add_ps(
        _mm512_castps512_ps256(all),
        _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(all))),
    );
    _mm_add_ps(
        _mm256_castps256_ps128(half),
        _mm256_extractf128_ps::<1>(half),
    )
}

/// The lanes of `0..len - from` (at most sixteen) of a slice starting at `from`.
#[inline]
fn lanes(len: usize, from: usize) -> __mmask16 {
    let n = (len - from).min(16);
    ((1u32 << n) - 1) as __mmask16
}

/// One row's attention for one kv head, [`crate::kernels`]' `head` for a head dimension of
/// `16 C`: scores `q . k * scale` in float32 (-inf where not allowed), their softmax, and
/// the weighted sum of the values, rounded into `o` `[group, 16 C]`. `scores` holds at least
/// `group * positions`. A row that allows no position gets NaN, as libtorch's attention does.
///
/// # Safety
/// The CPU has AVX-512F; `h.head_dim == 16 * C`; `h.keys` and `h.values` hold `positions`
/// rows of it; `h.allowed`, when given, `positions` flags.
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn head<T: Element, const C: usize>(
    h: &Head<'_, T>,
    scores: &mut [f32],
    o: &mut [T],
) {
    let (d, positions) = (16 * C, h.positions);
    assert!(h.head_dim == d && h.keys.len() >= positions * d && h.values.len() >= positions * d);
    assert!(h.allowed.is_none_or(|a| a.len() >= positions));
    let group = h.q.len() / d;
    let scores = &mut scores[..group * positions];
    for (j, q) in h.q.chunks_exact(d).enumerate() {
        // SAFETY: `q` holds `d` = 16 C values.
        let q: [__m512; C] =
            std::array::from_fn(|c| unsafe { _mm512_loadu_ps(q.as_ptr().add(16 * c)) });
        let s = &mut scores[j * positions..(j + 1) * positions];
        // Four positions at a time, their four sums added across lanes together.
        // Positions not allowed (and past the end) are not computed; their lanes' sums are
        // not read.
        let closed = _mm512_set1_ps(f32::NAN);
        let score = |p: usize| {
            if p >= positions || h.allowed.is_some_and(|a| a[p] == 0) {
                return closed;
            }
            // SAFETY: position `p < positions` of `d` values is inside `h.keys`.
            let mut acc = _mm512_mul_ps(q[0], unsafe { load16(h.keys, p * d) });
            for (c, q) in q.iter().enumerate().skip(1) {
                acc = _mm512_fmadd_ps(*q, unsafe { load16(h.keys, p * d + 16 * c) }, acc);
            }
            acc
        };
        let mut p = 0;
        while p < positions {
            let count = (positions - p).min(4);
            let acc: [__m512; 4] = std::array::from_fn(|i| score(p + i));
            let mut sums = [0f32; 4];
            // SAFETY: `sums` holds four float32.
            unsafe { _mm_storeu_ps(sums.as_mut_ptr(), sum4(acc)) };
            for (i, sum) in sums.iter().take(count).enumerate() {
                s[p + i] = if h.allowed.is_some_and(|a| a[p + i] == 0) {
                    f32::NEG_INFINITY
                } else {
                    sum * h.scale
                };
            }
            p += count;
        }
        softmax(s);
        let mut sum = [_mm512_setzero_ps(); C];
        for (p, &w) in s.iter().enumerate() {
            if w == 0.0 {
                continue;
            }
            let w = _mm512_set1_ps(w);
            for (c, sum) in sum.iter_mut().enumerate() {
                // SAFETY: position `p < positions` of `d` values is inside `h.values`.
                *sum = _mm512_fmadd_ps(w, unsafe { load16(h.values, p * d + 16 * c) }, *sum);
            }
        }
        let o = &mut o[j * d..(j + 1) * d];
        for (c, sum) in sum.iter().enumerate() {
            // SAFETY: `o` holds `d` = 16 C elements.
            unsafe { store16(o, 16 * c, *sum) };
        }
    }
}

/// `s` replaced by its softmax (in float32; all NaN when every score is -inf).
#[inline]
#[target_feature(enable = "avx512f")]
fn softmax(s: &mut [f32]) {
    let len = s.len();
    let mut max = _mm512_set1_ps(f32::NEG_INFINITY);
    for from in (0..len).step_by(16) {
        // SAFETY: the mask keeps the load inside `s`.
        let x = unsafe { _mm512_mask_loadu_ps(max, lanes(len, from), s.as_ptr().add(from)) };
        max = _mm512_max_ps(max, x);
    }
    let max = _mm512_reduce_max_ps(max);
    if max == f32::NEG_INFINITY {
        s.fill(f32::NAN);
        return;
    }
    let mut total = _mm512_setzero_ps();
    for from in (0..len).step_by(16) {
        let m = lanes(len, from);
        // SAFETY: the mask keeps the load and the store inside `s`.
        unsafe {
            let x = _mm512_maskz_loadu_ps(m, s.as_ptr().add(from));
            let e = exp16(_mm512_sub_ps(x, _mm512_set1_ps(max)));
            total = _mm512_mask_add_ps(total, m, total, e);
            _mm512_mask_storeu_ps(s.as_mut_ptr().add(from), m, e);
        }
    }
    let total = _mm512_set1_ps(_mm512_reduce_add_ps(total));
    for from in (0..len).step_by(16) {
        let m = lanes(len, from);
        // SAFETY: the mask keeps the load and the store inside `s`.
        unsafe {
            let x = _mm512_maskz_loadu_ps(m, s.as_ptr().add(from));
            _mm512_mask_storeu_ps(s.as_mut_ptr().add(from), m, _mm512_div_ps(x, total));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounding_is_puts() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let specials = [
            0x7f7f_ffffu32,
            0x7f80_0000,
            0x7fc0_0001,
            0xff80_0001,
            0x3f80_8000,
        ];
        let xs: Vec<u32> = (0..=u32::MAX).step_by(9973).chain(specials).collect();
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            for (l, x) in lanes.iter_mut().zip(chunk) {
                *l = f32::from_bits(*x);
            }
            let mut got = [half::bf16::ZERO; 16];
            // SAFETY: AVX-512F checked above; both arrays hold sixteen elements.
            unsafe { store16(&mut got, 0, _mm512_loadu_ps(lanes.as_ptr())) };
            for (x, g) in lanes.iter().zip(got) {
                let want = <half::bf16 as Element>::put(*x);
                assert_eq!(g.to_bits(), want.to_bits(), "{:#010x}", x.to_bits());
            }
        }
    }

    #[test]
    fn exp16_matches_expf() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        let xs: Vec<f32> = (0..4000)
            .map(|i| -100.0 + i as f32 * 0.0271)
            .chain([0.0, -0.0, f32::NEG_INFINITY, -87.2, -87.4, 1.5, 20.0])
            .collect();
        for chunk in xs.chunks(16) {
            let mut lanes = [0f32; 16];
            lanes[..chunk.len()].copy_from_slice(chunk);
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F checked above; both arrays hold sixteen float32.
            unsafe {
                _mm512_storeu_ps(got.as_mut_ptr(), exp16(_mm512_loadu_ps(lanes.as_ptr())));
            }
            for (x, e) in lanes.iter().zip(got) {
                let want = x.exp();
                if *x < -87.3 {
                    assert_eq!(e, 0.0, "exp({x})");
                } else {
                    let err = ((e - want) / want).abs();
                    assert!(err <= 2.5 * f32::EPSILON, "exp({x}) = {e}, expf {want}");
                }
            }
        }
        // SAFETY: AVX-512F checked above.
        let nan = unsafe { _mm512_reduce_add_ps(exp16(_mm512_set1_ps(f32::NAN))) };
        assert!(nan.is_nan());
    }
}
