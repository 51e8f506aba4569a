//! bfloat16 products for CPUs with AVX-512 but no AMX: the weights stay bfloat16 in memory
//! (half the bytes of float32) and are widened to float32 in registers, where float32 FMAs
//! multiply them. A product of two bfloat16 numbers is exact in float32, so this computes what
//! oneDNN's bfloat16 products compute (exact products, float32 sums, one rounding at the end)
//! up to the order of the sums.
//!
//! Why not oneDNN's: without AMX it runs `vdpbf16ps`, which this machine (a Sapphire Rapids
//! guest whose hypervisor hides AMX) issues at half the rate of float32 FMAs. A decoding step
//! of 8 rows through SmolLM2's 133M weights then took 28 ms, no faster than float32 (30 ms
//! with MKL's packs), though it reads half the bytes; widened in registers it takes 14 ms
//! (prototype, 2 threads), near the 12 ms the memory allows. Prompts (many rows) gain as well:
//! float32 FMAs do twice `vdpbf16ps`'s work per cycle here.
//!
//! Layout: the output features in blocks of 16 (one register of float32), two blocks to a
//! group; a group's weights are one stream, ordered by pairs of input features, and within a
//! pair by block, then by feature, each holding its two weights side by side (`w[o][2j]`,
//! `w[o][2j + 1]`). One 64-byte load holds a pair for 16 features; the even weight is the
//! low half of each 32-bit lane (shifted up, it is its float32), the odd one the high half
//! (masked). A tile of up to 8 rows by one group keeps its 16 sums in registers.

// The kernels are x86-64 only; elsewhere the products stay libtorch's.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use half::bf16;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Output features per block: one AVX-512 register of float32 sums.
const BLOCK: usize = 16;
/// Blocks per group, read as one stream.
const GROUP: usize = 2;
/// Rows per tile: 8 rows by 2 blocks is 16 sums, 4 widened weights and 2 broadcasts in the
/// 32 registers.
const TILE_ROWS: usize = 8;
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

/// A bfloat16 weight `[out, in]` in the widened products' layout.
pub(crate) struct WidenedWeight {
    out: usize,
    inp: usize,
    lines: Vec<Line>,
}

impl std::fmt::Debug for WidenedWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WidenedWeight([{}, {}])", self.out, self.inp)
    }
}

/// Whether bfloat16 products take the widened kernels here, checked once: the CPU has
/// AVX-512 Foundation and no AMX-BF16 (where it has AMX, oneDNN's tile products multiply
/// prompts many times faster than float32 FMAs can), and `RECONTROL_NO_WIDENED` is unset.
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| {
            // CPUID leaf 7, sub-leaf 0: EDX bit 22 is AMX-BF16.
            let amx_bf16 = (std::arch::x86_64::__cpuid_count(7, 0).edx >> 22) & 1 == 1;
            std::env::var_os("RECONTROL_NO_WIDENED").is_none()
                && std::arch::is_x86_feature_detected!("avx512f")
                && !amx_bf16
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl WidenedWeight {
    /// The layout of `weight` (bfloat16 `[out, in]`, any strides), or `None` when its shape
    /// does not fit the tiles (`out` not a multiple of 16, `in` odd) or the CPU lacks
    /// AVX-512.
    pub(crate) fn new(weight: &Tensor) -> Result<Option<Self>> {
        let [out, inp] = weight.size()[..] else {
            return Ok(None);
        };
        let (out, inp) = (out as usize, inp as usize);
        if !available()
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
        for group in 0..out.div_ceil(BLOCK * GROUP) {
            let first = group * BLOCK * GROUP;
            let blocks = ((out - first) / BLOCK).min(GROUP);
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
        Ok(Some(Self { out, inp, lines }))
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
        let groups = self.out.div_ceil(BLOCK * GROUP);
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
        let chunk = (CHUNK_BYTES / (4 * self.inp)).max(TILE_ROWS) / TILE_ROWS * TILE_ROWS;
        let mut start = 0;
        while start < rows {
            let end = rows.min(start + chunk);
            for group in groups.clone() {
                let first = group * BLOCK * GROUP;
                let blocks = ((self.out - first) / BLOCK).min(GROUP);
                let w = &self.lines[first * self.inp / 32..][..blocks * self.inp / 2];
                let mut row = start;
                while row < end {
                    let tile = (end - row).min(TILE_ROWS);
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
                    match (rows, blocks) {
                        $(
                            ($r, 2) => tile::<$r, 2>(x, w, self.inp, dst, self.out),
                            ($r, 1) => tile::<$r, 1>(x, w, self.inp, dst, self.out),
                        )*
                        _ => unreachable!("tiles of 1 to {TILE_ROWS} rows by 1 or 2 blocks"),
                    }
                };
            }
            // SAFETY: `available` found AVX-512F; `x` holds `rows` rows of `inp` and `w` the
            // group's `blocks * inp / 2` lines; `dst` is row `row`, column `column` of the
            // `[rows, out]` output, whose tile (these rows, `blocks * 16` columns from
            // `column`) lies inside it and is written by this call alone (the threads take
            // disjoint groups, so disjoint columns).
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

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use tch::Device;

    /// Whether this CPU takes the widened products; says so when a test is skipped.
    fn runs_here() -> bool {
        let runs = available();
        if !runs {
            eprintln!("skipped: the widened products do not run on this CPU");
        }
        runs
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

    /// The largest difference in units of the last place of bfloat16 at the reference's
    /// magnitude (1 ulp: the two sum in different orders before the one rounding).
    fn ulps(got: &Tensor, want: &Tensor) -> f64 {
        assert_eq!(got.size(), want.size());
        assert_eq!(got.kind(), Kind::BFloat16);
        let got = got.to_kind(Kind::Float);
        let want = want.to_kind(Kind::Float);
        let scale = (want.abs() + 1e-30) * 2f64.powi(-7);
        f64::try_from(((got - want).abs() / scale).max()).expect("max")
    }

    #[test]
    fn widened_products_match_float32_rounded_once() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        tch::manual_seed(3);
        // Output features: one block, an odd number of blocks (a last group of one), many;
        // rows: every tile height, several tiles, several chunks (in = 2048: 64 rows).
        for (out, inp) in [(16, 2), (48, 10), (96, 64), (64, 2048)] {
            let w = randn_bf16(&[out, inp]);
            // Stored [in, out] as the CPU layout stores it: the pack reads a transposed view.
            let stored = w.tr().contiguous();
            let widened = WidenedWeight::new(&stored.tr())?.expect("fits the tiles");
            for rows in [1, 2, 3, 5, 7, 8, 9, 17, 70, 130] {
                let x = randn_bf16(&[rows, inp]);
                let got = widened.product(&x)?;
                let d = ulps(&got, &reference(&x, &w));
                assert!(d <= 1.0, "[{rows}, {inp}] x [{out}, {inp}]: {d} ulps");
            }
            // Decoding shape [batch, 1, in] keeps its leading dimensions.
            let x = randn_bf16(&[3, 1, inp]);
            let got = widened.product(&x)?;
            assert_eq!(got.size(), [3, 1, out]);
            assert!(ulps(&got, &reference(&x, &w)) <= 1.0);
        }
        Ok(())
    }

    #[test]
    fn a_product_large_enough_splits_and_matches() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        tch::manual_seed(4);
        // 8 x 576 x 960 is over PARALLEL_WORK: the groups split over two threads.
        let w = randn_bf16(&[960, 576]);
        const { assert!(8 * 576 * 960 >= PARALLEL_WORK) };
        let widened = WidenedWeight::new(&w)?.expect("fits");
        let x = randn_bf16(&[8, 576]);
        let got = widened.product(&x)?;
        assert!(ulps(&got, &reference(&x, &w)) <= 1.0);
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
        let widened = WidenedWeight::new(&w)?.expect("fits");
        let got = widened.product(&x)?;
        assert!(got.equal(&reference(&x, &w)));
        Ok(())
    }

    #[test]
    fn rounding_is_libtorchs_and_nan_is_kept() -> Result<()> {
        if !runs_here() {
            return Ok(());
        }
        // One input feature pair: y = x0 * w0 + x1 * w1 with w = (1, 0), so y = x0 exactly;
        // sums that fall between two bfloat16 numbers come from two features.
        let w = Tensor::from_slice(&[1f32, 1.0 / 256.0].repeat(16))
            .reshape([16, 2])
            .to_kind(Kind::BFloat16);
        let widened = WidenedWeight::new(&w)?.expect("fits");
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
            assert!(got.equal(&reference(&x, &w)), "{a} {b}");
        }
        let x = Tensor::from_slice(&[f32::NAN, 1.0])
            .reshape([1, 2])
            .to_kind(Kind::BFloat16);
        assert!(widened.product(&x)?.isnan().all().int64_value(&[]) == 1);
        Ok(())
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
