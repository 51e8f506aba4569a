//! Decoding products in our own tiles, for CPUs where the matrix libraries' are slower: the
//! weights are laid out once as the tile loop reads them (one stream per group of output
//! features), and a tile of a few rows keeps its sums in registers while the stream goes by.
//! Two element types, two bodies each (AVX-512F, and AVX2 with FMA: most laptops, AMD's Zen 3
//! servers), and a third for bfloat16:
//!
//! - **bfloat16, widened** (CPUs without AMX): the weights stay bfloat16 in memory (half the
//!   bytes of float32) and are widened to float32 in registers, where float32 FMAs multiply
//!   them. A product of two bfloat16 numbers is exact in float32, so this computes what
//!   oneDNN's bfloat16 products compute (exact products, float32 sums, one rounding at the
//!   end) up to the order of the sums. Why not oneDNN's: without AMX it runs `vdpbf16ps` where
//!   the CPU has AVX512-BF16, which a Sapphire Rapids guest whose hypervisor hides AMX issues
//!   at half the rate of float32 FMAs. A decoding step of 8 rows through SmolLM2's 133M
//!   weights then took 28 ms, no faster than float32 (30 ms with MKL's packs), though it reads
//!   half the bytes; widened in registers it takes 14 ms (prototype, 2 threads), near the 12 ms
//!   the memory allows. Prompts (many rows) gain as well: float32 FMAs do twice `vdpbf16ps`'s
//!   work per cycle there. With AVX2 alone oneDNN has no bfloat16 instructions at all.
//! - **bfloat16, paired** (CPUs with AVX512-BF16 other than Intel's: AMD's Zen 4 and later):
//!   a third body for the same layout, where `vdpbf16ps` runs at the rate of a float32 FMA and
//!   so does twice its multiplications. Widened, a batch of 8 rows (and a prompt) is bound by
//!   the FMAs there, so bfloat16 ran no faster than the float32 tiles. `vdpbf16ps` multiplies
//!   exactly and adds in float32 as the widened body does, up to the order of each pair's two
//!   terms, but reads and writes subnormal numbers as zero. `RECONTROL_BF16_DOT=1` or `=0`
//!   overrides the choice.
//! - **float32** (decoding steps, on CPUs other than Intel's): MKL's products, packed or not,
//!   run its generic code on AMD's CPUs; on a Zen 3 guest a decoding step of 8 rows through
//!   SmolLM2 in MKL's packs streamed the weights at about 6 GB/s where the widened bfloat16
//!   tiles streamed theirs at 11. On Intel's CPUs MKL keeps them (measured there at 1.8-2.0x
//!   transformers' batch-8 decoding); `RECONTROL_F32_TILES=1` or `=0` overrides the choice.
//!
//! Layout: the output features in blocks of 16 (one AVX-512 register of float32, two AVX2
//! ones), [`Isa::blocks`] blocks to a group; a group's weights are one stream of 64-byte lines,
//! ordered by input step and within a step by block. A float32 step is one input feature: a
//! line holds its 16 features' weights. A bfloat16 step is a pair of input features: a line
//! holds, for each of the 16 features, its two weights side by side (`w[o][2j]` the low half
//! of a 32-bit lane, which shifted up is its float32; `w[o][2j + 1]` the high half, masked). A
//! tile of up to [`Isa::tile_rows`] rows by one group keeps its sums in registers.

// The kernels are x86-64 only; elsewhere the products stay libtorch's.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use std::sync::OnceLock;

use half::bf16;
use tch::{Kind, Tensor};

use crate::error::{Error, Result};

/// Output features per block: one AVX-512 register of float32 sums, two AVX2 ones.
const BLOCK: usize = 16;
/// How far ahead in the weights' stream the tile asks for them (bytes): the hardware
/// prefetcher alone left the loop waiting on memory (a prototype's 8-row bfloat16 pass over
/// SmolLM2: 28 ms without, 14 ms with 1 KiB); generating 48 tokens at batch 8 in bf16, 1, 2,
/// 4, 8 and 16 KiB gave about 220, 245, 245, 260 and 240 tokens/s.
const PREFETCH: usize = 8192;
/// Bytes of float32 rows of `x` kept in the core's L2 while a row chunk meets every group.
const CHUNK_BYTES: usize = 512 * 1024;
/// The work (rows x inputs x outputs) from which a product splits its groups over two
/// threads.
const PARALLEL_WORK: usize = 1 << 18;

/// 64 bytes of weights, aligned to a cache line: 16 lanes of 32 bits, one per output feature.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([u32; BLOCK]);

/// The tiles' body: the vector instructions it is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F with AVX512-BF16, for bfloat16 only: `vdpbf16ps` multiplies the weights'
    /// pairs by the inputs' (both bfloat16) into float32 sums.
    Avx512Bf16,
    /// AVX-512F: 32 registers of 16 float32.
    Avx512,
    /// AVX2 and FMA: 16 registers of 8 float32.
    Avx2,
}

impl Isa {
    /// Every body, the fastest first.
    const ALL: [Isa; 3] = [Isa::Avx512Bf16, Isa::Avx512, Isa::Avx2];

    /// Blocks per group, read as one stream.
    fn blocks(self) -> usize {
        match self {
            Isa::Avx512Bf16 | Isa::Avx512 => 2,
            Isa::Avx2 => 1,
        }
    }

    /// Rows per tile. AVX-512: 8 rows by 2 blocks is 16 sums, 4 widened weights and 2
    /// broadcasts in the 32 registers (2 weights and 1 broadcast in float32 or paired).
    /// AVX2: 4 rows by one block (two registers) is 8 sums, 4 widened weights, the mask and 2
    /// broadcasts in the 16.
    fn tile_rows(self) -> usize {
        match self {
            Isa::Avx512Bf16 | Isa::Avx512 => 8,
            Isa::Avx2 => 4,
        }
    }

    /// Whether the body multiplies weights of `format`.
    fn takes(self, format: Format) -> bool {
        self != Isa::Avx512Bf16 || format == Format::Bf16
    }

    /// Whether this CPU runs the body.
    #[cfg(target_arch = "x86_64")]
    fn runs_here(self) -> bool {
        match self {
            Isa::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
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

    /// The fastest body this CPU runs for `format` (the paired one where [`bf16_dot`]).
    fn here(format: Format) -> Option<Isa> {
        Isa::ALL.into_iter().find(|&isa| {
            isa.runs_here() && isa.takes(format) && (isa != Isa::Avx512Bf16 || bf16_dot())
        })
    }
}

/// The weights' element type in the tiles (the products' inputs and outputs are the same).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    /// bfloat16 (widened to float32 in registers, or paired by `vdpbf16ps`); sums rounded
    /// once to bfloat16.
    Bf16,
    /// float32.
    F32,
}

impl Format {
    fn of(kind: Kind) -> Option<Self> {
        match kind {
            Kind::BFloat16 => Some(Format::Bf16),
            Kind::Float => Some(Format::F32),
            _ => None,
        }
    }

    fn kind(self) -> Kind {
        match self {
            Format::Bf16 => Kind::BFloat16,
            Format::F32 => Kind::Float,
        }
    }

    /// Input features per step of the stream (per line of one block).
    fn step(self) -> usize {
        match self {
            Format::Bf16 => 2,
            Format::F32 => 1,
        }
    }
}

/// A weight `[out, in]` in the tiles' layout.
pub(crate) struct TiledWeight {
    out: usize,
    inp: usize,
    isa: Isa,
    format: Format,
    lines: Vec<Line>,
}

impl std::fmt::Debug for TiledWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "TiledWeight({:?} [{}, {}])",
            self.format, self.out, self.inp
        )
    }
}

/// Whether the CPU has AMX-BF16 (CPUID leaf 7, sub-leaf 0: EDX bit 22).
#[cfg(target_arch = "x86_64")]
fn amx_bf16() -> bool {
    (std::arch::x86_64::__cpuid_count(7, 0).edx >> 22) & 1 == 1
}

/// Whether the CPU is Intel's (CPUID leaf 0: "GenuineIntel" in EBX, EDX, ECX).
#[cfg(target_arch = "x86_64")]
fn intel() -> bool {
    let id = std::arch::x86_64::__cpuid(0);
    [id.ebx, id.edx, id.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"GenuineIntel")
}

/// A choice that `variable` overrides (`0`: no, any other value: yes), else on CPUs other
/// than Intel's.
#[cfg(target_arch = "x86_64")]
fn off_intel(variable: &str) -> bool {
    match std::env::var_os(variable) {
        Some(v) => v != "0",
        None => !intel(),
    }
}

/// Whether the tiles take float32 decoding products (`RECONTROL_F32_TILES`).
#[cfg(target_arch = "x86_64")]
fn f32_tiles() -> bool {
    off_intel("RECONTROL_F32_TILES")
}

/// Whether bfloat16 products take the paired body where the CPU has it
/// (`RECONTROL_BF16_DOT`): measured on AMD's Zen 4, not on Intel's CPUs with AVX512-BF16
/// (Cooper Lake; Sapphire Rapids guests without AMX, whose `vdpbf16ps` runs at half rate).
#[cfg(target_arch = "x86_64")]
fn bf16_dot() -> bool {
    off_intel("RECONTROL_BF16_DOT")
}

#[cfg(not(target_arch = "x86_64"))]
fn bf16_dot() -> bool {
    false
}

/// The body products of `kind` take here, checked once: AVX-512F (with AVX512-BF16 where
/// [`bf16_dot`], for bfloat16), else AVX2 with FMA; for bfloat16 on a CPU without AMX-BF16
/// (where it has AMX, oneDNN's tile products multiply prompts many times faster than float32
/// FMAs can; none either when `RECONTROL_NO_WIDENED` is set), for float32 where
/// [`f32_tiles`]; none for other kinds.
pub(crate) fn isa(kind: Kind) -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        static BF16: OnceLock<Option<Isa>> = OnceLock::new();
        static F32: OnceLock<Option<Isa>> = OnceLock::new();
        match Format::of(kind)? {
            Format::Bf16 => *BF16.get_or_init(|| {
                if std::env::var_os("RECONTROL_NO_WIDENED").is_some() || amx_bf16() {
                    return None;
                }
                Isa::here(Format::Bf16)
            }),
            Format::F32 => *F32.get_or_init(|| Isa::here(Format::F32).filter(|_| f32_tiles())),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = kind;
        None
    }
}

impl TiledWeight {
    /// The layout of `weight` (bfloat16 or float32 `[out, in]`, any strides) for this CPU's
    /// body for its kind ([`isa`]), or `None` when its shape does not fit the tiles (`out`
    /// not a multiple of 16, `in` odd in bfloat16) or products of its kind take no body here.
    pub(crate) fn new(weight: &Tensor) -> Result<Option<Self>> {
        match isa(weight.kind()) {
            Some(isa) => Self::for_isa(weight, isa),
            None => Ok(None),
        }
    }

    /// The layout of `weight` for the body `isa`, or `None` where [`Self::new`] gives none
    /// for its shape or kind or the CPU does not run that body.
    fn for_isa(weight: &Tensor, isa: Isa) -> Result<Option<Self>> {
        let [out, inp] = weight.size()[..] else {
            return Ok(None);
        };
        let (out, inp) = (out as usize, inp as usize);
        let Some(format) = Format::of(weight.kind()) else {
            return Ok(None);
        };
        if !isa.runs_here()
            || !isa.takes(format)
            || out == 0
            || inp == 0
            || out % BLOCK != 0
            || inp % format.step() != 0
        {
            return Ok(None);
        }
        let weight = weight.f_contiguous()?;
        let steps = inp / format.step();
        let lines = match format {
            Format::Bf16 => {
                let w: &[bf16] = crate::kernels::elements(&weight)?;
                lay_out(out, steps, isa, |o, s| {
                    let pair = &w[o * inp + 2 * s..][..2];
                    u32::from(pair[0].to_bits()) | u32::from(pair[1].to_bits()) << 16
                })
            }
            Format::F32 => {
                let w: &[f32] = crate::kernels::elements(&weight)?;
                lay_out(out, steps, isa, |o, s| w[o * inp + s].to_bits())
            }
        };
        Ok(Some(Self {
            out,
            inp,
            isa,
            format,
            lines,
        }))
    }

    /// `x W^T` for `x` `[..., in]` of the weight's kind on the CPU, in that kind (bfloat16
    /// sums rounded once, as libtorch rounds); the rows split over libtorch's two threads
    /// when there is work enough.
    pub(crate) fn product(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.size();
        let kind = self.format.kind();
        if shape.last() != Some(&(self.inp as i64)) || x.kind() != kind {
            return Err(Error::Kernel(format!(
                "tiled product of {shape:?} {:?} by {self:?}",
                x.kind(),
            )));
        }
        let x = x.f_contiguous()?;
        let rows = x.numel() / self.inp;
        *shape.last_mut().expect("checked") = self.out as i64;
        let mut y = Tensor::f_empty(shape.as_slice(), (kind, x.device()))?;
        if rows == 0 {
            return Ok(y);
        }
        match (self.format, self.isa) {
            (Format::Bf16, Isa::Avx512Bf16) => {
                let out: &mut [bf16] = crate::kernels::elements_mut(&mut y)?;
                let out = Output(out.as_mut_ptr() as *mut u8);
                self.run(Rows::Bf16(crate::kernels::elements(&x)?), rows, out);
            }
            (Format::Bf16, _) => {
                let wide: Vec<f32> = crate::kernels::elements::<bf16>(&x)?
                    .iter()
                    .map(|v| v.to_f32())
                    .collect();
                let out: &mut [bf16] = crate::kernels::elements_mut(&mut y)?;
                self.run(Rows::F32(&wide), rows, Output(out.as_mut_ptr() as *mut u8));
            }
            (Format::F32, _) => {
                let out: &mut [f32] = crate::kernels::elements_mut(&mut y)?;
                let out = Output(out.as_mut_ptr() as *mut u8);
                self.run(Rows::F32(crate::kernels::elements(&x)?), rows, out);
            }
        }
        Ok(y)
    }

    /// `y = x W^T` for `rows` rows `x`, into `y` `[rows, out]` of the weight's kind.
    fn run(&self, x: Rows<'_>, rows: usize, y: Output) {
        assert_eq!(x.len(), rows * self.inp);
        let groups = self.out.div_ceil(BLOCK * self.isa.blocks());
        if groups >= 2 && rows * self.inp * self.out >= PARALLEL_WORK {
            crate::team::share(groups, |range| self.run_groups(x, rows, &y, range));
        } else {
            self.run_groups(x, rows, &y, 0..groups);
        }
    }

    /// The output features of `groups` for every row.
    fn run_groups(&self, x: Rows<'_>, rows: usize, y: &Output, groups: std::ops::Range<usize>) {
        let tile_rows = self.isa.tile_rows();
        let chunk = (CHUNK_BYTES / (4 * self.inp)).max(tile_rows) / tile_rows * tile_rows;
        let steps = self.inp / self.format.step();
        let mut start = 0;
        while start < rows {
            let end = rows.min(start + chunk);
            for group in groups.clone() {
                let first = group * BLOCK * self.isa.blocks();
                let blocks = ((self.out - first) / BLOCK).min(self.isa.blocks());
                let w = &self.lines[first / BLOCK * steps..][..blocks * steps];
                let mut row = start;
                while row < end {
                    let tile = (end - row).min(tile_rows);
                    self.tile(
                        x.rows(row * self.inp, tile * self.inp),
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
    fn tile(&self, x: Rows<'_>, w: &[Line], blocks: usize, y: &Output, row: usize, column: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let rows = x.len() / self.inp;
            let (inp, ldy) = (self.inp, self.out);
            let at = row * ldy + column;
            let bf16_dst = (y.0 as *mut u16).wrapping_add(at);
            let f32_dst = (y.0 as *mut f32).wrapping_add(at);
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match (self.isa, self.format, x, rows, blocks) {
                        $(
                            (Isa::Avx512Bf16, _, Rows::Bf16(x), $r, 2) => tile_dot::<$r, 2>(x, w, inp, bf16_dst, ldy),
                            (Isa::Avx512Bf16, _, Rows::Bf16(x), $r, 1) => tile_dot::<$r, 1>(x, w, inp, bf16_dst, ldy),
                            (Isa::Avx512, Format::Bf16, Rows::F32(x), $r, 2) => tile_widened::<$r, 2>(x, w, inp, bf16_dst, ldy),
                            (Isa::Avx512, Format::Bf16, Rows::F32(x), $r, 1) => tile_widened::<$r, 1>(x, w, inp, bf16_dst, ldy),
                            (Isa::Avx512, Format::F32, Rows::F32(x), $r, 2) => tile_f32::<$r, 2>(x, w, inp, f32_dst, ldy),
                            (Isa::Avx512, Format::F32, Rows::F32(x), $r, 1) => tile_f32::<$r, 1>(x, w, inp, f32_dst, ldy),
                        )*
                        (Isa::Avx2, Format::Bf16, Rows::F32(x), 1, 1) => tile_widened_avx2::<1>(x, w, inp, bf16_dst, ldy),
                        (Isa::Avx2, Format::Bf16, Rows::F32(x), 2, 1) => tile_widened_avx2::<2>(x, w, inp, bf16_dst, ldy),
                        (Isa::Avx2, Format::Bf16, Rows::F32(x), 3, 1) => tile_widened_avx2::<3>(x, w, inp, bf16_dst, ldy),
                        (Isa::Avx2, Format::Bf16, Rows::F32(x), 4, 1) => tile_widened_avx2::<4>(x, w, inp, bf16_dst, ldy),
                        (Isa::Avx2, Format::F32, Rows::F32(x), 1, 1) => tile_avx2_f32::<1>(x, w, inp, f32_dst, ldy),
                        (Isa::Avx2, Format::F32, Rows::F32(x), 2, 1) => tile_avx2_f32::<2>(x, w, inp, f32_dst, ldy),
                        (Isa::Avx2, Format::F32, Rows::F32(x), 3, 1) => tile_avx2_f32::<3>(x, w, inp, f32_dst, ldy),
                        (Isa::Avx2, Format::F32, Rows::F32(x), 4, 1) => tile_avx2_f32::<4>(x, w, inp, f32_dst, ldy),
                        _ => unreachable!("a tile of {rows} rows by {blocks} blocks for {self:?} {:?}", self.isa),
                    }
                };
            }
            // SAFETY: `for_isa` found the body's instructions on this CPU; `x` holds `rows`
            // rows of `inp` (in the element type its body reads: `product` gives the paired
            // body bfloat16 rows, the others float32) and `w` the group's `blocks * steps`
            // lines; the destination is row `row`, column `column` of the `[rows, out]` output
            // of the weight's element type, whose tile (these rows, `blocks * 16` columns from
            // `column`) lies inside it and is written by this call alone (the threads take
            // disjoint groups, so disjoint columns).
            unsafe { dispatch!(1 2 3 4 5 6 7 8) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        unreachable!(
            "tiled weights are made on x86-64 only ({x:?} {w:?} {blocks} {y:?} {row} {column})"
        );
    }
}

/// The lines of a weight of `out` output features and `steps` input steps for body `isa`,
/// `lane(o, s)` the 32 bits of output feature `o` at step `s` (generic, so that the copy of
/// every weight at loading calls it inline).
fn lay_out(out: usize, steps: usize, isa: Isa, lane: impl Fn(usize, usize) -> u32) -> Vec<Line> {
    let mut lines = vec![Line::default(); out / BLOCK * steps];
    let group_blocks = isa.blocks();
    for group in 0..out.div_ceil(BLOCK * group_blocks) {
        let first = group * BLOCK * group_blocks;
        let blocks = ((out - first) / BLOCK).min(group_blocks);
        let base = first / BLOCK * steps;
        for step in 0..steps {
            for block in 0..blocks {
                let line = &mut lines[base + step * blocks + block].0;
                for (f, lane_bits) in line.iter_mut().enumerate() {
                    *lane_bits = lane(first + block * BLOCK + f, step);
                }
            }
        }
    }
    lines
}

/// The rows of `x` as a body reads them: bfloat16 for the paired one, float32 for the others.
#[derive(Clone, Copy, Debug)]
enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

impl<'a> Rows<'a> {
    fn len(self) -> usize {
        match self {
            Rows::F32(x) => x.len(),
            Rows::Bf16(x) => x.len(),
        }
    }

    /// The `len` elements from `start`.
    fn rows(self, start: usize, len: usize) -> Rows<'a> {
        match self {
            Rows::F32(x) => Rows::F32(&x[start..][..len]),
            Rows::Bf16(x) => Rows::Bf16(&x[start..][..len]),
        }
    }
}

/// The output's elements (bfloat16 or float32), written by both threads at disjoint columns.
#[derive(Debug)]
struct Output(*mut u8);

// SAFETY: the threads write disjoint elements through it (see `TiledWeight::tile`).
#[allow(unsafe_code)]
unsafe impl Sync for Output {}

/// `R` rows of `x` (`inp` apart) by `B` blocks of float32 weights `w`, into `y` (`R` rows,
/// `ldy` apart, `B * 16` columns).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn tile_f32<const R: usize, const B: usize>(
    x: &[f32],
    w: &[Line],
    inp: usize,
    y: *mut f32,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == R * inp && w.len() == B * inp);
    let mut sums = [[_mm512_setzero_ps(); B]; R];
    let xs = x.as_ptr();
    let lines = w.as_ptr();
    for step in 0..inp {
        let mut ws = [_mm512_setzero_ps(); B];
        for (b, wb) in ws.iter_mut().enumerate() {
            // SAFETY (all the pointer arithmetic here): `step * B + b < w.len()`, a line is
            // 64 bytes aligned to 64, and `r * inp + step < x.len()`; the prefetch only hints
            // and may point past the end.
            let line = lines.add(step * B + b);
            _mm_prefetch::<_MM_HINT_T0>((line as *const i8).wrapping_add(PREFETCH));
            *wb = _mm512_load_ps(line as *const f32);
        }
        for (r, sums) in sums.iter_mut().enumerate() {
            let xv = _mm512_set1_ps(*xs.add(r * inp + step));
            for b in 0..B {
                sums[b] = _mm512_fmadd_ps(xv, ws[b], sums[b]);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (b, &s) in sums.iter().enumerate() {
            _mm512_storeu_ps(y.add(r * ldy + b * BLOCK), s);
        }
    }
}

/// `R` rows of `x` (`inp` apart) by one block of float32 weights `w`, into `y` (`R` rows,
/// `ldy` apart, 16 columns): [`tile_f32`] for AVX2, a line read as two registers.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_avx2_f32<const R: usize>(
    x: &[f32],
    w: &[Line],
    inp: usize,
    y: *mut f32,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == R * inp && w.len() == inp);
    let mut sums = [[_mm256_setzero_ps(); 2]; R];
    let xs = x.as_ptr();
    let lines = w.as_ptr();
    for step in 0..inp {
        // SAFETY (all the pointer arithmetic here): `step < w.len()`, a line is 64 bytes
        // aligned to 64, and `r * inp + step < x.len()`; the prefetch only hints and may
        // point past the end.
        let line = lines.add(step) as *const f32;
        _mm_prefetch::<_MM_HINT_T0>((line as *const i8).wrapping_add(PREFETCH));
        let ws = [_mm256_load_ps(line), _mm256_load_ps(line.add(8))];
        for (r, sums) in sums.iter_mut().enumerate() {
            let xv = _mm256_set1_ps(*xs.add(r * inp + step));
            for h in 0..2 {
                sums[h] = _mm256_fmadd_ps(xv, ws[h], sums[h]);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (h, &s) in sums.iter().enumerate() {
            _mm256_storeu_ps(y.add(r * ldy + 8 * h), s);
        }
    }
}

/// `R` rows of `x` (`inp` apart) by `B` blocks of bfloat16 weights `w`, widened, rounded to
/// bfloat16 into `y` (`R` rows, `ldy` apart, `B * 16` columns).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f")]
unsafe fn tile_widened<const R: usize, const B: usize>(
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
    for (r, sums) in sums.iter().enumerate() {
        for (b, &s) in sums.iter().enumerate() {
            store_bf16(s, y.add(r * ldy + b * BLOCK));
        }
    }
}

/// 16 float32 sums rounded to bfloat16 (to nearest even, as c10::BFloat16; NaN becomes
/// 0x7FC0) into `y[..16]`.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn store_bf16(s: std::arch::x86_64::__m512, y: *mut u16) {
    use std::arch::x86_64::*;
    let bits = _mm512_castps_si512(s);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(
        _mm512_add_epi32(bits, _mm512_set1_epi32(0x7FFF)),
        lsb,
    ));
    let is_nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(s, s);
    let nan = _mm512_set1_epi32(0x7FC0);
    let half = _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, is_nan, nan));
    // SAFETY: the caller's `y` holds 16 elements.
    _mm256_storeu_si256(y as *mut __m256i, half);
}

/// `R` rows of bfloat16 `x` (`inp` apart) by `B` blocks of bfloat16 weights `w`, paired by
/// `vdpbf16ps` (a lane's two weights by the row's two inputs at that step, added to its
/// float32 sum), rounded to bfloat16 into `y` (`R` rows, `ldy` apart, `B * 16` columns).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn tile_dot<const R: usize, const B: usize>(
    x: &[bf16],
    w: &[Line],
    inp: usize,
    y: *mut u16,
    ldy: usize,
) {
    use std::arch::x86_64::*;
    debug_assert!(x.len() == R * inp && w.len() == B * inp / 2);
    let mut sums = [[_mm512_setzero_ps(); B]; R];
    // A row's inputs by pairs: one 32-bit lane each, as the weights' lanes.
    let pairs = x.as_ptr() as *const i32;
    let lines = w.as_ptr();
    for pair in 0..inp / 2 {
        let mut ws = [_mm512_setzero_si512(); B];
        for (b, wb) in ws.iter_mut().enumerate() {
            // SAFETY (all the pointer arithmetic here): `pair * B + b < w.len()`, a line is
            // 64 bytes aligned to 64, and `(r * inp) / 2 + pair < x.len() / 2` (`inp` is even;
            // bfloat16 data is only 2-aligned, hence the unaligned read); the prefetch only
            // hints and may point past the end.
            let line = lines.add(pair * B + b);
            _mm_prefetch::<_MM_HINT_T0>((line as *const i8).wrapping_add(PREFETCH));
            *wb = _mm512_load_si512(line as *const _);
        }
        for (r, sums) in sums.iter_mut().enumerate() {
            let xp = _mm512_set1_epi32(pairs.add(r * inp / 2 + pair).read_unaligned());
            let xp: __m512bh = std::mem::transmute(xp);
            for b in 0..B {
                let wb: __m512bh = std::mem::transmute(ws[b]);
                sums[b] = _mm512_dpbf16_ps(sums[b], xp, wb);
            }
        }
    }
    for (r, sums) in sums.iter().enumerate() {
        for (b, &s) in sums.iter().enumerate() {
            store_bf16(s, y.add(r * ldy + b * BLOCK));
        }
    }
}

/// `R` rows of `x` (`inp` apart) by one block of bfloat16 weights `w`, rounded to bfloat16
/// into `y` (`R` rows, `ldy` apart, 16 columns): [`tile_widened`] for AVX2, a block's line read as two
/// registers of eight features, each sum rounded as the decoding kernels round
/// (`bf16::from_f32`: to nearest even, as libtorch).
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
#[target_feature(enable = "avx2,fma")]
unsafe fn tile_widened_avx2<const R: usize>(
    x: &[f32],
    w: &[Line],
    inp: usize,
    y: *mut u16,
    ldy: usize,
) {
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

    /// The bodies this CPU runs for `format` (also where products do not take them: bfloat16
    /// on an AMX machine, float32 on Intel's); says so when there are none and a test is
    /// skipped.
    fn bodies(format: Format) -> Vec<Isa> {
        let bodies: Vec<Isa> = Isa::ALL
            .into_iter()
            .filter(|isa| isa.runs_here() && isa.takes(format))
            .collect();
        if bodies.is_empty() {
            eprintln!("skipped: the tiled products do not run on this CPU");
        }
        bodies
    }

    /// `weight` in the layout of body `isa`, which must fit.
    fn tiled(weight: &Tensor, isa: Isa) -> TiledWeight {
        TiledWeight::for_isa(weight, isa)
            .expect("a contiguous copy")
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
        for isa in bodies(Format::Bf16) {
            tch::manual_seed(3);
            // Output features: one block, an odd number of blocks (a last group of one),
            // many; rows: every tile height, several tiles, several chunks (in = 2048: 64
            // rows).
            for (out, inp) in [(16, 2), (48, 10), (96, 64), (64, 2048)] {
                let w = randn_bf16(&[out, inp]);
                // Stored [in, out] as the CPU layout stores it: the pack reads a transposed
                // view.
                let stored = w.tr().contiguous();
                let tiles = tiled(&stored.tr(), isa);
                for rows in [1, 2, 3, 4, 5, 7, 8, 9, 17, 70, 130] {
                    let x = randn_bf16(&[rows, inp]);
                    let got = tiles.product(&x)?;
                    let e = error(&got, &x, &w);
                    assert!(e <= 1.0, "{isa:?} [{rows}, {inp}] x [{out}, {inp}]: {e}");
                }
                // Decoding shape [batch, 1, in] keeps its leading dimensions.
                let x = randn_bf16(&[3, 1, inp]);
                let got = tiles.product(&x)?;
                assert_eq!(got.size(), [3, 1, out]);
                assert!(error(&got, &x, &w) <= 1.0, "{isa:?}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_product_large_enough_splits_and_matches() -> Result<()> {
        for isa in bodies(Format::Bf16) {
            tch::manual_seed(4);
            // 8 x 576 x 960 is over PARALLEL_WORK: the groups split over two threads.
            let w = randn_bf16(&[960, 576]);
            const { assert!(8 * 576 * 960 >= PARALLEL_WORK) };
            let x = randn_bf16(&[8, 576]);
            let got = tiled(&w, isa).product(&x)?;
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
            let got = tiled(&w, isa).product(&x)?;
            assert!(got.equal(&reference(&x, &w)), "{isa:?}");
        }
        Ok(())
    }

    #[test]
    fn float32_products_match_torchs() -> Result<()> {
        for isa in bodies(Format::F32) {
            tch::manual_seed(5);
            // An odd number of inputs (float32 steps are single features), one block, an odd
            // number of blocks, several chunks (in = 2048: 64 rows); rows as in the bfloat16
            // test; the split over two threads at 8 x 577 x 960.
            for (out, inp) in [(16, 1), (48, 9), (96, 64), (64, 2048), (960, 577)] {
                let w = Tensor::randn([out, inp], (Kind::Float, Device::Cpu));
                let tiles = tiled(&w.tr().contiguous().tr(), isa);
                for rows in [1, 2, 3, 4, 5, 7, 8, 9, 17, 70, 130] {
                    let x = Tensor::randn([rows, inp], (Kind::Float, Device::Cpu));
                    let got = tiles.product(&x)?;
                    assert_eq!(got.kind(), Kind::Float);
                    let want = x.matmul(&w.tr());
                    // Float32 sums in another order: within 2^-20 of the terms' magnitudes.
                    let bound = x.abs().matmul(&w.abs().tr()) * 2f64.powi(-20) + 1e-30;
                    let e = f64::try_from(((&got - &want).abs() / bound).max()).expect("max");
                    assert!(e <= 1.0, "{isa:?} [{rows}, {inp}] x [{out}, {inp}]: {e}");
                }
                let x = Tensor::randn([3, 1, inp], (Kind::Float, Device::Cpu));
                assert_eq!(tiles.product(&x)?.size(), [3, 1, out]);
            }
            // Exactly representable sums give the exact products, bit for bit.
            let w = Tensor::arange(960 * 577, (Kind::Float, Device::Cpu))
                .remainder(7)
                .f_sub_scalar(3)?
                .reshape([960, 577]);
            let x = Tensor::arange(8 * 577, (Kind::Float, Device::Cpu))
                .remainder(5)
                .f_sub_scalar(2)?
                .reshape([8, 577]);
            let got = tiled(&w, isa).product(&x)?;
            assert!(got.equal(&x.matmul(&w.tr())), "{isa:?}");
            // A bfloat16 input to float32 tiles is refused, not misread.
            assert!(tiled(&w, isa).product(&x.to_kind(Kind::BFloat16)).is_err());
        }
        Ok(())
    }

    #[test]
    fn rounding_is_libtorchs_and_nan_is_kept() -> Result<()> {
        for isa in bodies(Format::Bf16) {
            // One input feature pair: y = x0 * w0 + x1 * w1 with w = (1, 1/256); sums that
            // fall between two bfloat16 numbers (ties among them) come from two features.
            let w = Tensor::from_slice(&[1f32, 1.0 / 256.0].repeat(16))
                .reshape([16, 2])
                .to_kind(Kind::BFloat16);
            let tiles = tiled(&w, isa);
            for (a, b) in [
                (1.0f32, 1.0f32),
                (1.0 + 1.0 / 128.0, 1.0),
                (1.0, 0.5),
                (-3.0, 1.0),
            ] {
                let x = Tensor::from_slice(&[a, b])
                    .reshape([1, 2])
                    .to_kind(Kind::BFloat16);
                let got = tiles.product(&x)?;
                assert!(got.equal(&reference(&x, &w)), "{isa:?} {a} {b}");
            }
            let x = Tensor::from_slice(&[f32::NAN, 1.0])
                .reshape([1, 2])
                .to_kind(Kind::BFloat16);
            let nan = tiles.product(&x)?;
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

    /// Whether the CPU is Intel's, from the vendor string's registers as the manuals give them.
    fn intel_cpu() -> bool {
        let vendor = std::arch::x86_64::__cpuid(0);
        (vendor.ebx, vendor.edx, vendor.ecx) == (0x756E_6547, 0x4965_6E69, 0x6C65_746E)
    }

    /// Whether the setting `variable` (or, unset, a CPU other than Intel's) turns a choice on.
    fn setting(variable: &str) -> bool {
        match std::env::var(variable) {
            Ok(v) => v != "0",
            Err(_) => !intel_cpu(),
        }
    }

    #[test]
    fn the_body_is_paired_else_avx512_else_avx2_and_none_with_amx() {
        assert_eq!(intel_cpu(), intel());
        let want = if std::env::var_os("RECONTROL_NO_WIDENED").is_some() || amx_bf16() {
            None
        } else {
            let dot = setting("RECONTROL_BF16_DOT");
            bodies(Format::Bf16)
                .into_iter()
                .find(|&isa| isa != Isa::Avx512Bf16 || dot)
        };
        assert_eq!(isa(Kind::BFloat16), want);
        assert_eq!(isa(Kind::Half), None);
    }

    #[test]
    fn float32_takes_the_tiles_off_intel_cpus() {
        let want = if setting("RECONTROL_F32_TILES") {
            bodies(Format::F32).first().copied()
        } else {
            None
        };
        assert_eq!(isa(Kind::Float), want);
        assert_ne!(want, Some(Isa::Avx512Bf16));
    }

    #[test]
    fn shapes_outside_the_tiles_are_not_widened() -> Result<()> {
        let odd_out = Tensor::zeros([40, 24], (Kind::BFloat16, Device::Cpu));
        let odd_in = Tensor::zeros([32, 25], (Kind::BFloat16, Device::Cpu));
        let double = Tensor::zeros([32, 24], (Kind::Double, Device::Cpu));
        for w in [odd_out, odd_in, double] {
            assert!(TiledWeight::new(&w)?.is_none(), "{:?}", w.size());
        }
        // float32 tiles take an odd number of inputs (one per step).
        for isa in bodies(Format::F32) {
            let w = Tensor::zeros([32, 25], (Kind::Float, Device::Cpu));
            assert!(TiledWeight::for_isa(&w, isa)?.is_some());
            let w = Tensor::zeros([40, 25], (Kind::Float, Device::Cpu));
            assert!(TiledWeight::for_isa(&w, isa)?.is_none());
        }
        Ok(())
    }
}
