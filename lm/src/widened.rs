//! bfloat16 products for CPUs without AMX: the weights stay bfloat16 in memory (half the
//! bytes of float32) and are widened to float32 in registers, where float32 FMAs multiply
//! them. A product of two bfloat16 numbers is exact in float32, so this computes what
//! oneDNN's bfloat16 products compute (exact products, float32 sums, one rounding at the end)
//! up to the order of the sums. Two bodies: AVX-512F, and AVX2 with FMA (most laptops, and
//! AMD's Zen 3 servers).
//!
//! Why not oneDNN's: without AMX it runs `vdpbf16ps` where the CPU has AVX512-BF16, which a
//! Sapphire Rapids guest whose hypervisor hides AMX issues at half the rate of float32 FMAs.
//! A decoding step of 8 rows through SmolLM2's 133M weights then took 28 ms, no faster than
//! float32 (30 ms with MKL's packs), though it reads half the bytes; widened in registers it
//! takes 14 ms (prototype, 2 threads), near the 12 ms the memory allows. Prompts (many rows)
//! gain as well: float32 FMAs do twice `vdpbf16ps`'s work per cycle there. With AVX2 alone
//! oneDNN has no bfloat16 instructions at all.
//!
//! Layout: the output features in blocks of 16 (one AVX-512 register of float32, two AVX2
//! ones), [`Isa::blocks`] blocks to a group; a group's weights are one stream, ordered by
//! pairs of input features, and within a pair by block, then by feature, each holding its
//! two weights side by side (`w[o][2j]`, `w[o][2j + 1]`). One 64-byte line holds a pair for
//! 16 features; the even weight is the low half of each 32-bit lane (shifted up, it is its
//! float32), the odd one the high half (masked). A tile of up to [`Isa::tile_rows`] rows by
//! one group keeps its sums in registers.

// The kernels are x86-64 only; elsewhere the products stay libtorch's.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use half::bf16;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Output features per block: one AVX-512 register of float32 sums, two AVX2 ones.
const BLOCK: usize = 16;
/// How far ahead in the weights' stream the tile asks for them (bytes): the hardware
/// prefetcher alone left the loop waiting on memory (a prototype's 8-row pass over SmolLM2:
/// 28 ms without, 14 ms with 1 KiB); generating 48 tokens at batch 8 in bf16, 1, 2, 4, 8 and
/// 16 KiB gave about 220, 245, 245, 260 and 240 tokens/s.
const PREFETCH: usize = 8192;
/// Bytes of float32 rows of `x` kept in the core's L2 while a row chunk meets every group.
const CHUNK_BYTES: usize = 512 * 1024;
/// The work (rows x inputs x outputs) from which a product splits its groups over two
/// threads.
const PARALLEL_WORK: usize = 1 << 18;

/// 64 bytes of weights, aligned to a cache line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// The widened products' body: the vector instructions it is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F: 32 registers of 16 float32.
    Avx512,
    /// AVX2 and FMA: 16 registers of 8 float32.
    Avx2,
}

impl Isa {
    /// Every body, the fastest first.
    const ALL: [Isa; 2] = [Isa::Avx512, Isa::Avx2];

    /// Blocks per group, read as one stream.
    fn blocks(self) -> usize {
        match self {
            Isa::Avx512 => 2,
            Isa::Avx2 => 1,
        }
    }

    /// Rows per tile. AVX-512: 8 rows by 2 blocks is 16 sums, 4 widened weights and 2
    /// broadcasts in the 32 registers. AVX2: 4 rows by one block (two registers) is 8 sums,
    /// 4 widened weights, the mask and 2 broadcasts in the 16.
    fn tile_rows(self) -> usize {
        match self {
            Isa::Avx512 => 8,
            Isa::Avx2 => 4,
        }
    }

    /// Whether this CPU runs the body.
    #[cfg(target_arch = "x86_64")]
    fn runs_here(self) -> bool {
        match self {
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn runs_here(self) -> bool {
        false
    }
}

/// A bfloat16 weight `[out, in]` in the widened products' layout.
pub(crate) struct WidenedWeight {
    out: usize,
    inp: usize,
    isa: Isa,
    lines: Vec<Line>,
}

impl std::fmt::Debug for WidenedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WidenedWeight([{}, {}])", self.out, self.inp)
    }
}

/// Whether the CPU has AMX-BF16 (CPUID leaf 7, sub-leaf 0: EDX bit 22).
#[cfg(target_arch = "x86_64")]
fn amx_bf16() -> bool {
    (std::arch::x86_64::__cpuid_count(7, 0).edx >> 22) & 1 == 1
}

/// The body bfloat16 products take here, checked once: AVX-512F, else AVX2 with FMA, on a
/// CPU without AMX-BF16 (where it has AMX, oneDNN's tile products multiply prompts many
/// times faster than float32 FMAs can); none when `RECONTROL_NO_WIDENED` is set.
pub(crate) fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var_os("RECONTROL_NO_WIDENED").is_some() || amx_bf16() {
                return None;
            }
            Isa::ALL.into_iter().find(|isa| isa.runs_here())
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

/// Whether bfloat16 products take the widened kernels here ([`isa`]).
pub(crate) fn available() -> bool {
    isa().is_some()
}

impl WidenedWeight {
    /// The layout of `weight` (bfloat16 `[out, in]`, any strides) for this CPU's body
    /// ([`isa`]), or `None` when its shape does not fit the tiles (`out` not a multiple of
    /// 16, `in` odd) or the CPU has no body.
    pub(crate) fn new(weight: &Tensor) -> Result<Option<Self>> {
        match isa() {
            Some(isa) => Self::for_isa(weight, isa),
            None => Ok(None),
        }
    }

    /// The layout of `weight` for the body `isa`, or `None` where [`Self::new`] gives none
    /// or the CPU does not run that body.
    fn for_isa(weight: &Tensor, isa: Isa) -> Result<Option<Self>> {
        let [out, inp] = weight.size()[..] else {
            return Ok(None);
        };
        let (out, inp) = (out as usize, inp as usize);
        if !isa.runs_here()
            || weight.kind() != Kind::BFloat16
            || out == 0
            || inp == 0
            || out % BLOCK != 0
            || inp % 2 != 0
        {
            return Ok(None);
        }
        let weight = weight.f_contiguous()?;
        let w: &[bf16] = crate::kernels::elements(&weight)?;
        let mut lines = vec![Line::default(); out * inp / 32];
        let pairs = inp / 2;
        let group_blocks = isa.blocks();
        for group in 0..out.div_ceil(BLOCK * group_blocks) {
            let first = group * BLOCK * group_blocks;
            let blocks = ((out - first) / BLOCK).min(group_blocks);
            let base = first * inp / 32;
            for pair in 0..pairs {
                for block in 0..blocks {
                    let line = &mut lines[base + pair * blocks + block].0;
                    for f in 0..BLOCK {
                        let row = &w[(first + block * BLOCK + f) * inp..][..inp];
                        line[2 * f] = row[2 * pair].to_bits();
                        line[2 * f + 1] = row[2 * pair + 1].to_bits();
                    }
                }
            }
        }
        Ok(Some(Self {
            out,
            inp,
            isa,
            lines,
        }))
    }

    /// `x W^T` for bfloat16 `x` `[..., in]` on the CPU (contiguous), rounded to bfloat16
    /// as libtorch rounds; the rows split over libtorch's two threads when there is work
    /// enough.
    pub(crate) fn product(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.size();
        if shape.last() != Some(&(self.inp as i64)) || x.kind() != Kind::BFloat16 {
            return Err(Error::Kernel(format!(
                "widened product of {shape:?} {:?} by [{}, {}]",
                x.kind(),
                self.out,
                self.inp
            )));
        }
        let x = x.f_contiguous()?;
        let rows = x.numel() / self.inp;
        *shape.last_mut().expect("checked") = self.out as i64;
        let mut y = Tensor::f_empty(shape.as_slice(), (Kind::BFloat16, x.device()))?;
        if rows == 0 {
            return Ok(y);
        }
        let wide: Vec<f32> = crate::kernels::elements::<bf16>(&x)?
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let out: &mut [bf16] = crate::kernels::elements_mut(&mut y)?;
        self.run(&wide, rows, out);
        Ok(y)
    }

    /// `y = x W^T` for `rows` float32 rows `x`, into bfloat16 `y` `[rows, out]`.
    fn run(&self, x: &[f32], rows: usize, y: &mut [bf16]) {
        assert_eq!(x.len(), rows * self.inp);
        assert_eq!(y.len(), rows * self.out);
        let groups = self.out.div_ceil(BLOCK * self.isa.blocks());
        let y = Output(y.as_mut_ptr() as *mut u16);
        if groups >= 2 && rows * self.inp * self.out >= PARALLEL_WORK {
            let mid = groups / 2;
            crate::team::join(
                || self.run_groups(x, rows, &y, 0..mid),
                || self.run_groups(x, rows, &y, mid..groups),
            );
        } else {
            self.run_groups(x, rows, &y, 0..groups);
        }
    }

    /// The output features of `groups` for every row.
    fn run_groups(&self, x: &[f32], rows: usize, y: &Output, groups: std::ops::Range<usize>) {
        let tile_rows = self.isa.tile_rows();
        let chunk = (CHUNK_BYTES / (4 * self.inp)).max(tile_rows) / tile_rows * tile_rows;
        let mut start = 0;
        while start < rows {
            let end = rows.min(start + chunk);
            for group in groups.clone() {
                let first = group * BLOCK * self.isa.blocks();
                let blocks = ((self.out - first) / BLOCK).min(self.isa.blocks());
                let w = &self.lines[first * self.inp / 32..][..blocks * self.inp / 2];
                let mut row = start;
                while row < end {
                    let tile = (end - row).min(tile_rows);
                    self.tile(
                        &x[row * self.inp..][..tile * self.inp],
                        w,
                        blocks,
                        y,
                        row,
                        first,
                    );
                    row += tile;
                }
            }
            start = end;
        }
    }

    /// One tile: `x` (its rows) by one group of weights `w`, into `y` at `row`, `column`.
    #[allow(unsafe_code)]
    fn tile(&self, x: &[f32], w: &[Line], blocks: usize, y: &Output, row: usize, column: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let rows = x.len() / self.inp;
            let dst = y.0.wrapping_add(row * self.out + column);
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match (self.isa, rows, blocks) {
                        $(
                            (Isa::Avx512, $r, 2) => tile::<$r, 2>(x, w, self.inp, dst, self.out),
                            (Isa::Avx512, $r, 1) => tile::<$r, 1>(x, w, self.inp, dst, self.out),
                        )*
                        (Isa::Avx2, 1, 1) => tile_avx2::<1>(x, w, self.inp, dst, self.out),
                        (Isa::Avx2, 2, 1) => tile_avx2::<2>(x, w, self.inp, dst, self.out),
                        (Isa::Avx2, 3, 1) => tile_avx2::<3>(x, w, self.inp, dst, self.out),
                        (Isa::Avx2, 4, 1) => tile_avx2::<4>(x, w, self.inp, dst, self.out),
                        _ => unreachable!("a tile of {rows} rows by {blocks} blocks for {:?}", self.isa),
                    }
                };
            }
            // SAFETY: `for_isa` found the body's instructions on this CPU; `x` holds `rows`
            // rows of `inp` and `w` the group's `blocks * inp / 2` lines; `dst` is row `row`,
            // column `column` of the `[rows, out]` output, whose tile (these rows,
            // `blocks * 16` columns from `column`) lies inside it and is written by this
            // call alone (the threads take disjoint groups, so disjoint columns).
            unsafe { dispatch!(1 2 3 4 5 6 7 8) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "widened weights are made on x86-64 only ({x:?} {w:?} {blocks} {y:?} {row} {column})"
        );
    }
}

/// The output's elements, written by both threads at disjoint columns.
struct Output(*mut u16);

// SAFETY: the threads write disjoint elements through it (see `WidenedWeight::tile`).
#[allow(unsafe_code)]
unsafe impl Sync for Output {}

/// `R` rows of `x` (`inp` apart) by `B` blocks of weights `w`, rounded to bfloat16 into `y`
/// (`R` rows, `ldy` apart, `B * 16` columns).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn tile<const R: usize, const B: usize>(
    x: &[f32],
    w: &[Line],
    inp: usize,
    y: *mut u16,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == R * inp && w.len() == B * inp / 2);
    let high = _mm512_set1_epi32(0xFFFF_0000_u32 as i32);
    let mut sums = [[_mm512_setzero_ps(); B]; R];
    let xs = x.as_ptr();
    let lines = w.as_ptr();
    for pair in 0..inp / 2 {
        let mut even = [_mm512_setzero_ps(); B];
        let mut odd = [_mm512_setzero_ps(); B];
        for b in 0..B {
            // SAFETY (all the pointer arithmetic here): `pair * B + b < w.len()`, and
            // `r * inp + 2 * pair + 1 < x.len()`; the prefetch only hints and may point past
            // the end.
            let line = lines.add(pair * B + b);
            _mm_prefetch::<_MM_HINT_T0>((line as *const i8).wrapping_add(PREFETCH));
            let v = _mm512_load_si512(line as *const _);
            even[b] = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v));
            odd[b] = _mm512_castsi512_ps(_mm512_and_si512(v, high));
        }
        for (r, sums) in sums.iter_mut().enumerate() {
            let xe = _mm512_set1_ps(*xs.add(r * inp + 2 * pair));
            let xo = _mm512_set1_ps(*xs.add(r * inp + 2 * pair + 1));
            for b in 0..B {
                sums[b] = _mm512_fmadd_ps(xe, even[b], sums[b]);
                sums[b] = _mm512_fmadd_ps(xo, odd[b], sums[b]);
            }
        }
    }
    let one = _mm512_set1_epi32(1);
    let rounding = _mm512_set1_epi32(0x7FFF);
    let nan = _mm512_set1_epi32(0x7FC0);
    for (r, sums) in sums.iter().enumerate() {
        for (b, &s) in sums.iter().enumerate() {
            // Round to nearest even as c10::BFloat16 does; NaN becomes 0x7FC0.
            let bits = _mm512_castps_si512(s);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), one);
            let rounded =
                _mm512_srli_epi32::<16>(_mm512_add_epi32(_mm512_add_epi32(bits, rounding), lsb));
            let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(s, s);
            let half = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, nan));
            _mm256_storeu_si256(y.add(r * ldy + b * BLOCK) as *mut __m256i, half);
        }
    }
}

/// `R` rows of `x` (`inp` apart) by one block of weights `w`, rounded to bfloat16 into `y`
/// (`R` rows, `ldy` apart, 16 columns): [`tile`] for AVX2, a block's line read as two
/// registers of eight features, each sum rounded as the decoding kernels round
/// (`bf16::from_f32`: to nearest even, as libtorch).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2<const R: usize>(x: &[f32], w: &[Line], inp: usize, y: *mut u16, ldy: usize) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == R * inp && w.len() == inp / 2);
    let high = _mm256_set1_epi32(0xFFFF_0000_u32 as i32);
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    let xs = x.as_ptr();
    let lines = w.as_ptr();
    for pair in 0..inp / 2 {
        // SAFETY (all the pointer arithmetic here): `pair < w.len()`, a line is 64 bytes
        // aligned to 64, and `r * inp + 2 * pair + 1 < x.len()`; the prefetch only hints and
        // may point past the end.
        let line = lines.add(pair) as *const __m256i;
        _mm_prefetch::<_MM_HINT_T0>((line as *const i8).wrapping_add(PREFETCH));
        let mut even = [_mm256_setzero_ps(); 2];
        let mut odd = [_mm256_setzero_ps(); 2];
        for h in 0..2 {
            let v = _mm256_load_si256(line.add(h));
            even[h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
            odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, high));
        }
        for (r, sums) in sums.iter_mut().enumerate() {
            let xe = _mm256_set1_ps(*xs.add(r * inp + 2 * pair));
            let xo = _mm256_set1_ps(*xs.add(r * inp + 2 * pair + 1));
            for h in 0..2 {
                sums[h] = _mm256_fmadd_ps(xe, even[h], sums[h]);
                sums[h] = _mm256_fmadd_ps(xo, odd[h], sums[h]);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        let mut block = [0f32; BLOCK];
        _mm256_storeu_ps(block.as_mut_ptr(), sums[0]);
        _mm256_storeu_ps(block.as_mut_ptr().add(8), sums[1]);
        for (f, &s) in block.iter().enumerate() {
            *y.add(r * ldy + f) = half::bf16::from_f32(s).to_bits();
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use tch::Device;

    /// The bodies this CPU runs (on an AMX machine too, where products do not take them);
    /// says so when there are none and a test is skipped.
    fn bodies() -> Vec<Isa> {
        let bodies: Vec<Isa> = Isa::ALL.into_iter().filter(|isa| isa.runs_here()).collect();
        if bodies.is_empty() {
            eprintln!("skipped: the widened products do not run on this CPU");
        }
        bodies
    }

    /// `weight` in the layout of body `isa`, which must fit.
    fn widen(weight: &Tensor, isa: Isa) -> WidenedWeight {
        WidenedWeight::for_isa(weight, isa)
            .expect("a bfloat16 weight")
            .expect("fits the tiles")
    }

    /// Normal random bfloat16 numbers of `shape`.
    fn randn_bf16(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Float, Device::Cpu)).to_kind(Kind::BFloat16)
    }

    /// `x W^T` in float32 from the same bfloat16 numbers, rounded once to bfloat16.
    fn reference(x: &Tensor, w: &Tensor) -> Tensor {
        x.to_kind(Kind::Float)
            .matmul(&w.to_kind(Kind::Float).tr())
            .to_kind(Kind::BFloat16)
    }

    /// The largest difference from the float32 product of the same bfloat16 numbers, in
    /// units of what the two may differ by: one bfloat16 ulp at the reference's magnitude
    /// (the one rounding), plus float32 sums in another order (2^-17 of the sum of the
    /// terms' magnitudes; a sum that cancels to near zero differs by more than an ulp of
    /// itself).
    fn error(got: &Tensor, x: &Tensor, w: &Tensor) -> f64 {
        let want = reference(x, w).to_kind(Kind::Float);
        assert_eq!(got.size(), want.size());
        assert_eq!(got.kind(), Kind::BFloat16);
        let terms = x
            .to_kind(Kind::Float)
            .abs()
            .matmul(&w.to_kind(Kind::Float).abs().tr());
        let bound = want.abs() * 2f64.powi(-7) + terms * 2f64.powi(-17) + 1e-30;
        let got = got.to_kind(Kind::Float);
        f64::try_from(((got - &want).abs() / bound).max()).expect("max")
    }

    #[test]
    fn widened_products_match_float32_rounded_once() -> Result<()> {
        for isa in bodies() {
            tch::manual_seed(3);
            // Output features: one block, an odd number of blocks (a last group of one),
            // many; rows: every tile height, several tiles, several chunks (in = 2048: 64
            // rows).
            for (out, inp) in [(16, 2), (48, 10), (96, 64), (64, 2048)] {
                let w = randn_bf16(&[out, inp]);
                // Stored [in, out] as the CPU layout stores it: the pack reads a transposed
                // view.
                let stored = w.tr().contiguous();
                let widened = widen(&stored.tr(), isa);
                for rows in [1, 2, 3, 4, 5, 7, 8, 9, 17, 70, 130] {
                    let x = randn_bf16(&[rows, inp]);
                    let got = widened.product(&x)?;
                    let e = error(&got, &x, &w);
                    assert!(e <= 1.0, "{isa:?} [{rows}, {inp}] x [{out}, {inp}]: {e}");
                }
                // Decoding shape [batch, 1, in] keeps its leading dimensions.
                let x = randn_bf16(&[3, 1, inp]);
                let got = widened.product(&x)?;
                assert_eq!(got.size(), [3, 1, out]);
                assert!(error(&got, &x, &w) <= 1.0, "{isa:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_product_large_enough_splits_and_matches() -> Result<()> {
        for isa in bodies() {
            tch::manual_seed(4);
            // 8 x 576 x 960 is over PARALLEL_WORK: the groups split over two threads.
            let w = randn_bf16(&[960, 576]);
            const { assert!(8 * 576 * 960 >= PARALLEL_WORK) };
            let x = randn_bf16(&[8, 576]);
            let got = widen(&w, isa).product(&x)?;
            assert!(error(&got, &x, &w) <= 1.0, "{isa:?}");
            // Exactly representable sums give the exact products, bit for bit.
            let w = Tensor::arange(960 * 576, (Kind::Float, Device::Cpu))
                .remainder(7)
                .f_sub_scalar(3)?
                .reshape([960, 576])
                .to_kind(Kind::BFloat16);
            let x = Tensor::arange(8 * 576, (Kind::Float, Device::Cpu))
                .remainder(5)
                .f_sub_scalar(2)?
                .reshape([8, 576])
                .to_kind(Kind::BFloat16);
            let got = widen(&w, isa).product(&x)?;
            assert!(got.equal(&reference(&x, &w)), "{isa:?}");
        }
        Ok(())
    }

    #[test]
    fn rounding_is_libtorchs_and_nan_is_kept() -> Result<()> {
        for isa in bodies() {
            // One input feature pair: y = x0 * w0 + x1 * w1 with w = (1, 1/256); sums that
            // fall between two bfloat16 numbers (ties among them) come from two features.
            let w = Tensor::from_slice(&[1f32, 1.0 / 256.0].repeat(16))
                .reshape([16, 2])
                .to_kind(Kind::BFloat16);
            let widened = widen(&w, isa);
            for (a, b) in [
                (1.0f32, 1.0f32),
                (1.0 + 1.0 / 128.0, 1.0),
                (1.0, 0.5),
                (-3.0, 1.0),
            ] {
                let x = Tensor::from_slice(&[a, b])
                    .reshape([1, 2])
                    .to_kind(Kind::BFloat16);
                let got = widened.product(&x)?;
                assert!(got.equal(&reference(&x, &w)), "{isa:?} {a} {b}");
            }
            let x = Tensor::from_slice(&[f32::NAN, 1.0])
                .reshape([1, 2])
                .to_kind(Kind::BFloat16);
            let nan = widened.product(&x)?;
            assert!(nan.isnan().all().int64_value(&[]) == 1, "{isa:?}");
        }
        // The AVX2 body's scalar rounding (`bf16::from_f32`, the decoding kernels' too)
        // against libtorch's, for float32 numbers about every bfloat16 boundary and tie (and
        // infinities, signed zeros, subnormals).
        let mut values: Vec<f32> = (-300..300)
            .flat_map(|i| {
                let bits = ((i as f32) * 0.37).to_bits() & 0xFFFF_0000;
                [0x0000, 0x7FFF, 0x8000, 0x8001, 0x18000, 0xFFFF].map(|d| f32::from_bits(bits + d))
            })
            .collect();
        values.extend([
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.0,
            1e-40,
            -1e-40,
            f32::MAX,
        ]);
        let want = Tensor::from_slice(&values).to_kind(Kind::BFloat16);
        let want: Vec<u16> = crate::kernels::elements::<bf16>(&want)?
            .iter()
            .map(|v| v.to_bits())
            .collect();
        let got: Vec<u16> = values
            .iter()
            .map(|&v| bf16::from_f32(v).to_bits())
            .collect();
        assert_eq!(got, want);
        Ok(())
    }

    #[test]
    fn the_body_is_avx512_else_avx2_and_none_with_amx() {
        let want = if std::env::var_os("RECONTROL_NO_WIDENED").is_some() || amx_bf16() {
            None
        } else {
            bodies().first().copied()
        };
        assert_eq!(isa(), want);
    }

    #[test]
    fn shapes_outside_the_tiles_are_not_widened() -> Result<()> {
        let odd_out = Tensor::zeros([40, 24], (Kind::BFloat16, Device::Cpu));
        let odd_in = Tensor::zeros([32, 25], (Kind::BFloat16, Device::Cpu));
        let float = Tensor::zeros([32, 24], (Kind::Float, Device::Cpu));
        for w in [odd_out, odd_in, float] {
            assert!(WidenedWeight::new(&w)?.is_none(), "{:?}", w.size());
        }
        Ok(())
    }
}
