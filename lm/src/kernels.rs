//! Decoding-sized CPU kernels in plain Rust: the RMS norm, the gated SiLU, and one decoding
//! step of attention (rotary positions, the cache write and the attention itself in one
//! pass). At batch 1 a token cost about 1,700 small libtorch ops, and a third of the time
//! went to their dispatch while the second core waited; these replace most of them. They
//! take decoding steps in float32 or bfloat16 on the CPU ([`applies`]), computing in float32
//! and rounding where transformers' ops round; anything else keeps the libtorch ops, which
//! are also the reference the tests check these against. A step's attention over a long cache
//! splits its rows over libtorch's two OpenMP threads ([`crate::team`]).

use half::bf16;
use tch::{Device, Kind, Tensor};

use crate::error::{Error, Result};

/// The most rows a kernel takes: decoding batches, whose small ops cost more to dispatch
/// than to run.
pub(crate) const MAX_ROWS: usize = 64;

/// The rows of `x` when it is a decoding step: one position per row (`[batch, 1, features]`
/// or `[batch, features]`), at most [`MAX_ROWS`] rows. Prompts keep libtorch's ops, which are
/// threaded and give transformers' results to the bit.
pub(crate) fn decoding_rows(x: &Tensor) -> Option<i64> {
    match x.size()[..] {
        [batch, 1, _] | [batch, _] if batch as usize <= MAX_ROWS => Some(batch),
        _ => None,
    }
}

/// Whether the kernels take `x` (with `params` beside it): a decoding step
/// ([`decoding_rows`]), float32 or bfloat16 on the CPU (`params` of the same kind),
/// contiguous, with no gradient wanted.
pub(crate) fn applies(x: &Tensor, params: &[&Tensor]) -> bool {
    let kind = x.kind();
    let plain = |t: &Tensor| {
        t.device() == Device::Cpu && t.kind() == kind && t.is_contiguous() && !t.requires_grad()
    };
    matches!(kind, Kind::Float | Kind::BFloat16)
        && decoding_rows(x).is_some()
        && plain(x)
        && params.iter().all(|p| plain(p))
}

/// An element type the kernels read and write: computed in float32, stored rounded.
pub(crate) trait Element: Send + Sync + Copy + 'static {
    const KIND: Kind;
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
}

impl Element for f32 {
    const KIND: Kind = Kind::Float;
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    const KIND: Kind = Kind::BFloat16;
    #[inline(always)]
    fn get(self) -> f32 {
        self.to_f32()
    }
    /// Round to nearest even, as libtorch rounds (and `half`'s `from_f32`), without a
    /// branch, so that loops of it vectorize: `x + 0x7fff + lsb` carries into the kept bits
    /// exactly when the dropped half is above a half unit, or equal with an odd lsb; a NaN
    /// keeps its sign and top bits, made quiet.
    #[inline(always)]
    fn put(v: f32) -> Self {
        let x = v.to_bits();
        let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
        let quiet = (x >> 16) | 0x40;
        bf16::from_bits(if v.is_nan() { quiet } else { rounded } as u16)
    }
}

/// The elements of a contiguous CPU tensor of `T`.
#[allow(unsafe_code)]
pub(crate) fn elements<T: Element>(t: &Tensor) -> Result<&[T]> {
    check(t, T::KIND)?;
    if t.numel() == 0 {
        return Ok(&[]);
    }
    // SAFETY: `check` found a defined, contiguous CPU tensor whose elements are `T` (f32, or
    // bf16 whose `half` type is its 16 bits), so `data_ptr` (which includes the storage
    // offset) points at `numel` initialized, aligned `T`s that live at least as long as the
    // borrow of `t`. The kernels write only to tensors they created or hold mutably, never
    // to storage that a live slice from here reads.
    Ok(unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, t.numel()) })
}

/// The elements of a contiguous CPU tensor of `T`, to write.
#[allow(unsafe_code)]
pub(crate) fn elements_mut<T: Element>(t: &mut Tensor) -> Result<&mut [T]> {
    check(t, T::KIND)?;
    if t.numel() == 0 {
        return Ok(&mut []);
    }
    // SAFETY: as in `elements`; the mutable borrow of `t` keeps this module from reading the
    // same tensor while the slice lives.
    Ok(unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, t.numel()) })
}

/// The elements of a contiguous boolean CPU tensor, as bytes (0 or 1).
#[allow(unsafe_code)]
fn flags(t: &Tensor) -> Result<&[u8]> {
    check(t, Kind::Bool)?;
    if t.numel() == 0 {
        return Ok(&[]);
    }
    // SAFETY: as in `elements`; libtorch stores a bool as one byte, 0 or 1.
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

/// Sum of squares in float32 with 16 independent lanes (so that it vectorizes).
#[inline(always)]
fn sum_squares<T: Element>(x: &[T]) -> f32 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let tail: f32 = chunks.remainder().iter().map(|v| v.get() * v.get()).sum();
    for c in chunks {
        for (l, v) in lanes.iter_mut().zip(c) {
            *l += v.get() * v.get();
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `a . b` in float32 with 16 independent lanes (one AVX-512 register, two AVX2 ones),
/// added pairwise at the end.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 16;
    let mut lanes = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        // Fixed-size chunks: the loop below becomes whole-register operations.
        let (x, y): (&[f32; LANES], &[f32; LANES]) = match (x.try_into(), y.try_into()) {
            (Ok(x), Ok(y)) => (x, y),
            _ => unreachable!("chunks_exact yields chunks of {LANES}"),
        };
        for i in 0..LANES {
            lanes[i] += x[i] * y[i];
        }
    }
    // Halves added pairwise (a few vector adds) rather than lane by lane (15 dependent ones,
    // which cost a decoding step's attention more than its products did).
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            lanes[i] += lanes[i + width];
        }
    }
    lanes[0] + tail
}

/// Llama's RMS norm of each row of `x` `[.., hidden]`: `w * (x / sqrt(mean(x^2) + eps))`,
/// the variance in float32, the normed row rounded to the input's type before the weight.
pub(crate) fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    match x.kind() {
        Kind::BFloat16 => rms_norm_of::<bf16>(x, weight, eps),
        _ => rms_norm_of::<f32>(x, weight, eps),
    }
}

fn rms_norm_of<T: Element>(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let w = elements::<T>(weight)?;
    let mut out = Tensor::f_empty(x.size(), (T::KIND, Device::Cpu))?;
    let o = elements_mut::<T>(&mut out)?;
    for (row, o) in elements::<T>(x)?
        .chunks_exact(w.len())
        .zip(o.chunks_exact_mut(w.len()))
    {
        let variance = sum_squares(row) / w.len() as f32;
        let inv = 1.0 / (variance + eps as f32).sqrt();
        for ((o, x), w) in o.iter_mut().zip(row).zip(w) {
            *o = T::put(w.get() * T::put(x.get() * inv).get());
        }
    }
    Ok(out)
}

/// Each row's index of its largest value, as libtorch's `argmax(-1)` gives it on the CPU:
/// the first maximum, or the first NaN where the row has one. `logits` `[rows, vocab]`,
/// float32 or bfloat16 on the CPU, contiguous, `vocab >= 1`; `None` otherwise (the caller
/// keeps libtorch's op). Many rows split over the team's two threads.
pub(crate) fn argmax_rows(logits: &Tensor) -> Result<Option<Vec<i64>>> {
    let plain = logits.device() == Device::Cpu
        && logits.dim() == 2
        && logits.size()[1] >= 1
        && logits.is_contiguous()
        && !logits.requires_grad();
    match (plain, logits.kind()) {
        (true, Kind::Float) => argmax_of::<f32>(logits).map(Some),
        (true, Kind::BFloat16) => argmax_of::<bf16>(logits).map(Some),
        _ => Ok(None),
    }
}

/// The elements (rows x vocabulary) from which [`argmax_rows`] splits its rows over two
/// threads.
const ARGMAX_PARALLEL: usize = 1 << 15;

fn argmax_of<T: Element>(logits: &Tensor) -> Result<Vec<i64>> {
    let vocab = logits.size()[1] as usize;
    let x = elements::<T>(logits)?;
    let mut out = vec![0i64; x.len() / vocab];
    let rows_argmax = |x: &[T], out: &mut [i64]| {
        for (row, o) in x.chunks_exact(vocab).zip(out) {
            *o = first_max(row) as i64;
        }
    };
    if out.len() >= 2 && x.len() >= ARGMAX_PARALLEL {
        let mid = out.len() / 2;
        let (first, second) = out.split_at_mut(mid);
        let (x1, x2) = x.split_at(mid * vocab);
        crate::team::join(|| rows_argmax(x1, first), || rows_argmax(x2, second));
    } else {
        rows_argmax(x, &mut out);
    }
    Ok(out)
}

/// libtorch's argmax of one non-empty row: the row's maximum over 16 lanes (so that it
/// vectorizes) and whether it holds a NaN, then the first position holding that.
fn first_max<T: Element>(row: &[T]) -> usize {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut nan = [false; 16];
    let chunks = row.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for ((l, n), v) in lanes.iter_mut().zip(&mut nan).zip(c) {
            let v = v.get();
            *n |= v.is_nan();
            *l = if v > *l { v } else { *l };
        }
    }
    let has_nan = nan.iter().any(|&n| n) || tail.iter().any(|v| v.get().is_nan());
    if has_nan {
        return row.iter().position(|v| v.get().is_nan()).unwrap_or(0);
    }
    let max = lanes
        .iter()
        .copied()
        .chain(tail.iter().map(|v| v.get()))
        .fold(f32::NEG_INFINITY, |m, v| if v > m { v } else { m });
    row.iter().position(|v| v.get() == max).unwrap_or(0)
}

/// `silu(gate) * up` of `both` `[.., 2 inter]` = `[gate | up]`: `[.., inter]`.
pub(crate) fn silu_mul(both: &Tensor) -> Result<Tensor> {
    match both.kind() {
        Kind::BFloat16 => silu_mul_of::<bf16>(both),
        _ => silu_mul_of::<f32>(both),
    }
}

fn silu_mul_of<T: Element>(both: &Tensor) -> Result<Tensor> {
    let mut size = both.size();
    let inter = size.last().copied().unwrap_or(0) / 2;
    if let Some(last) = size.last_mut() {
        *last = inter;
    }
    let inter = inter as usize;
    let mut out = Tensor::f_empty(size, (T::KIND, Device::Cpu))?;
    let o = elements_mut::<T>(&mut out)?;
    let both = elements::<T>(both)?;
    if o.len() >= SILU_PARALLEL {
        // Elements are independent: the second half of them on a second thread (a decoding
        // step's `exp`s held the other core waiting: 8% of a batch-8 bfloat16 step).
        let mid = o.len() / 2;
        let (first, second) = o.split_at_mut(mid);
        crate::team::join(
            || silu_mul_into(both, inter, 0, first),
            || silu_mul_into(both, inter, mid, second),
        );
    } else {
        silu_mul_into(both, inter, 0, o);
    }
    Ok(out)
}

/// The outputs from which [`silu_mul`] splits its elements between two threads.
const SILU_PARALLEL: usize = 4096;

/// Outputs `start..start + o.len()` of [`silu_mul`] (flat over `[rows, inter]`) into `o`,
/// from `both` `[rows, 2 inter]`.
fn silu_mul_into<T: Element>(both: &[T], inter: usize, start: usize, mut o: &mut [T]) {
    let mut k = start;
    // A row's outputs at a time (the first and last may be partial).
    while !o.is_empty() {
        let (row, j) = (k / inter, k % inter);
        let n = (inter - j).min(o.len());
        let (head, rest) = std::mem::take(&mut o).split_at_mut(n);
        let gate = &both[row * 2 * inter + j..][..n];
        let up = &both[row * 2 * inter + inter + j..][..n];
        silu_mul_row(gate, up, head);
        o = rest;
        k += n;
    }
}

/// `silu(gate) * up` elementwise into `o`: `put(up * put(g / (1 + exp(-g))))`, libtorch's
/// `silu` and product in `T`; sixteen at a time where the CPU has AVX-512.
fn silu_mul_row<T: Element>(gate: &[T], up: &[T], o: &mut [T]) {
    // The whole sixteens in AVX-512, the rest here.
    #[cfg(target_arch = "x86_64")]
    let done = if std::arch::is_x86_feature_detected!("avx512f") {
        #[allow(unsafe_code)]
        // SAFETY: this CPU has AVX-512F, all `silu_mul_row` is compiled for.
        unsafe {
            crate::avx512::silu_mul_row(gate, up, o)
        }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    let (gate, up) = (&gate[done..], &up[done..]);
    for ((o, g), u) in o[done..].iter_mut().zip(gate).zip(up) {
        let g = g.get();
        *o = T::put(u.get() * T::put(g / (1.0 + (-g).exp())).get());
    }
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

/// `x * cos + rotate_half(x) * sin` into `out`, each product and the sum rounded to `T`
/// (two loops over zipped halves, without a branch or an index check inside, so that they
/// vectorize).
#[inline(always)]
fn rotate<T: Element, U: Element>(x: &[T], cos: &[T], sin: &[T], out: &mut [U]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (cos1, cos2) = cos[..x.len()].split_at(half);
    let (sin1, sin2) = sin[..x.len()].split_at(half);
    let (out1, out2) = out[..x.len()].split_at_mut(half);
    let one = |x: T, cos: T, rotated: f32, sin: T| {
        let (a, b) = (T::put(x.get() * cos.get()), T::put(rotated * sin.get()));
        U::put(T::put(a.get() + b.get()).get())
    };
    let pairs = out1
        .iter_mut()
        .zip(x1.iter().zip(x2))
        .zip(cos1.iter().zip(sin1));
    for ((o, (a, b)), (c, s)) in pairs {
        *o = one(*a, *c, -b.get(), *s);
    }
    let pairs = out2
        .iter_mut()
        .zip(x2.iter().zip(x1))
        .zip(cos2.iter().zip(sin2));
    for ((o, (a, b)), (c, s)) in pairs {
        *o = one(*a, *c, b.get(), *s);
    }
}

/// The inputs of one decoding step of attention ([`decode_attention`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeStep<'a> {
    /// The new token's queries, keys and values `[batch, 1, (heads + 2 kv_heads) head_dim]`
    /// (`[q | k | v]`).
    pub(crate) qkv: &'a Tensor,
    /// The rotary table `[batch, 1, 1, head_dim]`.
    pub(crate) cos: &'a Tensor,
    pub(crate) sin: &'a Tensor,
    /// The positions each row attends to, `[batch | 1, 1, 1, start + 1]` (none: all).
    pub(crate) allowed: Option<&'a Tensor>,
    /// The cache position of the new token.
    pub(crate) start: usize,
    pub(crate) heads: DecodeHeads,
}

/// One decoding step of attention for every row: rotates the new token's queries and keys,
/// writes its key and value at position `start` of the layer's cache `keys`, `values`
/// `[batch, kv_heads, capacity, head_dim]`, and attends over positions `0..=start`, those
/// allowed. Scores, softmax and sums in float32. Returns `[batch, 1, heads head_dim]`.
pub(crate) fn decode_attention(
    step: &DecodeStep<'_>,
    keys: &mut Tensor,
    values: &mut Tensor,
) -> Result<Tensor> {
    match step.qkv.kind() {
        Kind::BFloat16 => decode_attention_of::<bf16>(step, keys, values),
        _ => decode_attention_of::<f32>(step, keys, values),
    }
}

fn decode_attention_of<T: Element>(
    step: &DecodeStep<'_>,
    keys: &mut Tensor,
    values: &mut Tensor,
) -> Result<Tensor> {
    let (qkv, start, h) = (step.qkv, step.start, step.heads);
    let (n, kv, d) = (h.heads, h.kv_heads, h.head_dim);
    let batch = qkv.size()[0] as usize;
    let capacity = keys.size().get(2).copied().unwrap_or(0) as usize;
    let width = (n + 2 * kv) * d;
    let positions = start + 1;
    let shape_error = || {
        Error::Kernel(format!(
            "decode attention: qkv {:?}, cos {:?}, cache {:?}, start {start}",
            qkv.size(),
            step.cos.size(),
            keys.size()
        ))
    };
    let qkv = elements::<T>(qkv)?;
    let (cos, sin) = (elements::<T>(step.cos)?, elements::<T>(step.sin)?);
    let allowed = step.allowed.map(flags).transpose()?;
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
        return Err(shape_error());
    }
    let mut out = Tensor::f_empty([batch as i64, 1, (n * d) as i64], (T::KIND, Device::Cpu))?;
    let o = elements_mut::<T>(&mut out)?;
    let (ks, vs) = (elements_mut::<T>(keys)?, elements_mut::<T>(values)?);
    let cache = Cache {
        keys: ks,
        values: vs,
        capacity,
    };
    let step = Step {
        qkv,
        cos,
        sin,
        allowed,
        start,
        heads: h,
    };
    if batch >= 2 && batch * positions * n * d >= PARALLEL_WORK {
        // Rows are independent: the second half of them on a second thread.
        let mid = batch / 2;
        let (step, second_step) = step.split(mid);
        let (cache, second_cache) = cache.split(mid * kv * capacity * d);
        let (o, second_o) = o.split_at_mut(mid * n * d);
        crate::team::join(
            || attend_fastest(&step, cache, o),
            || attend_fastest(&second_step, second_cache, second_o),
        );
    } else {
        attend_fastest(&step, cache, o);
    }
    Ok(out)
}

/// The attention work (rows x positions x heads x head dim) from which a decoding step's rows
/// are split between two threads: below it, starting a thread costs more than it saves.
const PARALLEL_WORK: usize = 1 << 16;

/// [`attend`] compiled for the best instructions this CPU has: with AVX-512 and a head
/// dimension of 64, 128 or 256, each head in [`crate::avx512`]'s body.
fn attend_fastest<T: Element>(step: &Step<'_, T>, cache: Cache<'_, T>, o: &mut [T]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        #[allow(unsafe_code)]
        // SAFETY: this CPU has AVX-512F (and with it AVX2 and FMA), all `attend_avx512` and
        // `attend_heads_avx512` are compiled for.
        unsafe {
            match step.heads.head_dim {
                64 => attend_heads_avx512::<T, 4>(step, cache, o),
                128 => attend_heads_avx512::<T, 8>(step, cache, o),
                256 => attend_heads_avx512::<T, 16>(step, cache, o),
                _ => attend_avx512(step, cache, o),
            }
        };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        #[allow(unsafe_code)]
        // SAFETY: this CPU has AVX2 and FMA, all `attend_avx2` is compiled for.
        unsafe {
            attend_avx2(step, cache, o)
        };
        return;
    }
    attend(step, cache, o, |h, s, o| head(h, s, o, dot));
}

/// One decoding step's inputs, as slices (see [`decode_attention`]).
struct Step<'a, T> {
    qkv: &'a [T],
    cos: &'a [T],
    sin: &'a [T],
    allowed: Option<&'a [u8]>,
    start: usize,
    heads: DecodeHeads,
}

impl<T> Step<'_, T> {
    /// Rows `..mid` and rows `mid..`.
    fn split(self, mid: usize) -> (Self, Self) {
        let h = self.heads;
        let width = (h.heads + 2 * h.kv_heads) * h.head_dim;
        let (qkv, qkv_rest) = self.qkv.split_at(mid * width);
        let (cos, cos_rest) = self.cos.split_at(mid * h.head_dim);
        let (sin, sin_rest) = self.sin.split_at(mid * h.head_dim);
        let positions = self.start + 1;
        // One mask row for all rows, or one per row.
        let (allowed, allowed_rest) = match self.allowed {
            Some(a) if a.len() != positions => {
                let (a, rest) = a.split_at(mid * positions);
                (Some(a), Some(rest))
            }
            shared => (shared, shared),
        };
        let part = |qkv, cos, sin, allowed| Step {
            qkv,
            cos,
            sin,
            allowed,
            start: self.start,
            heads: h,
        };
        (
            part(qkv, cos, sin, allowed),
            part(qkv_rest, cos_rest, sin_rest, allowed_rest),
        )
    }
}

/// A layer's cache, `[batch, kv_heads, capacity, head_dim]` each.
struct Cache<'a, T> {
    keys: &'a mut [T],
    values: &'a mut [T],
    capacity: usize,
}

impl<T> Cache<'_, T> {
    /// The first `at` elements of each buffer (whole rows) and the rest.
    fn split(self, at: usize) -> (Self, Self) {
        let (keys, keys_rest) = self.keys.split_at_mut(at);
        let (values, values_rest) = self.values.split_at_mut(at);
        let capacity = self.capacity;
        (
            Cache {
                keys,
                values,
                capacity,
            },
            Cache {
                keys: keys_rest,
                values: values_rest,
                capacity,
            },
        )
    }
}

/// [`attend`] compiled for AVX2 and FMA (eight float32 lanes instead of SSE2's four).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn attend_avx2<T: Element>(step: &Step<'_, T>, cache: Cache<'_, T>, o: &mut [T]) {
    attend(step, cache, o, |h, s, o| head(h, s, o, dot))
}

/// [`attend`] compiled for AVX-512 (sixteen float32 lanes: one register per chunk of
/// [`dot`]).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn attend_avx512<T: Element>(step: &Step<'_, T>, cache: Cache<'_, T>, o: &mut [T]) {
    // SAFETY: this function is compiled for AVX-512F, all `dot_avx512` needs.
    #[allow(unsafe_code)]
    attend(step, cache, o, |h, s, o| {
        head(h, s, o, |a, b| unsafe { dot_avx512(a, b) })
    })
}

/// [`attend`] with each head in [`crate::avx512::head`], for a head dimension of `16 C`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
fn attend_heads_avx512<T: Element, const C: usize>(
    step: &Step<'_, T>,
    cache: Cache<'_, T>,
    o: &mut [T],
) {
    // SAFETY: this function is compiled for AVX-512F, all `head` needs; `attend` gives it
    // heads of `step.heads.head_dim` = 16 C dimensions.
    #[allow(unsafe_code)]
    attend(step, cache, o, |h, s, o| unsafe {
        crate::avx512::head::<T, C>(h, &mut s.scores, o)
    })
}

/// `a . b` in float32 in one AVX-512 register of sums, added pairwise at the end (LLVM
/// made [`dot`]'s 16 lanes eight pairs of two).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let len = a.len().min(b.len());
    let full = len / 16 * 16;
    let mut sums = _mm512_setzero_ps();
    let mut i = 0;
    while i < full {
        // SAFETY: `i + 16 <= len`, inside both slices.
        let (x, y) = unsafe {
            (
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
            )
        };
        sums = _mm512_fmadd_ps(x, y, sums);
        i += 16;
    }
    let tail: f32 = a[full..len]
        .iter()
        .zip(&b[full..len])
        .map(|(x, y)| x * y)
        .sum();
    _mm512_reduce_add_ps(sums) + tail
}

/// One row's attention for one kv head (see [`attend`]): its group of rotated queries `q`
/// `[group, head_dim]` over positions `0..positions` of its cache `keys`, `values`
/// `[.., head_dim]`, those `allowed` (none: all).
pub(crate) struct Head<'a, T> {
    pub(crate) q: &'a [f32],
    pub(crate) keys: &'a [T],
    pub(crate) values: &'a [T],
    pub(crate) allowed: Option<&'a [u8]>,
    pub(crate) positions: usize,
    pub(crate) head_dim: usize,
    pub(crate) scale: f32,
}

/// Working space of [`head`], sized once per step.
pub(crate) struct Scratch {
    /// `[group, positions]`.
    pub(crate) scores: Vec<f32>,
    /// `[group]`.
    totals: Vec<f32>,
    /// `[group, head_dim]`.
    sum: Vec<f32>,
    /// `[head_dim]`.
    row: Vec<f32>,
}

/// The body of [`decode_attention`], on validated slices; `o` `[batch, heads head_dim]`.
/// Writes each row's new key and value, then runs `head` for each row and kv head.
#[inline(always)]
fn attend<T: Element>(
    step: &Step<'_, T>,
    cache: Cache<'_, T>,
    o: &mut [T],
    head: impl Fn(&Head<'_, T>, &mut Scratch, &mut [T]),
) {
    let (qkv, cos, sin, allowed) = (step.qkv, step.cos, step.sin, step.allowed);
    let (start, h) = (step.start, step.heads);
    let (ks, vs, capacity) = (cache.keys, cache.values, cache.capacity);
    let (n, kv, d) = (h.heads, h.kv_heads, h.head_dim);
    let width = (n + 2 * kv) * d;
    let positions = start + 1;
    let batch = qkv.len() / width;
    let group = n / kv;
    // The queries of one kv head's group of heads, in float32.
    let mut q = vec![0f32; group * d];
    let mut scratch = Scratch {
        scores: vec![0f32; group * positions],
        totals: vec![0f32; group],
        sum: vec![0f32; group * d],
        row: vec![0f32; d],
    };
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
        for g in 0..kv {
            for (j, q) in q.chunks_exact_mut(d).enumerate() {
                rotate(&row[(g * group + j) * d..][..d], cos, sin, q);
            }
            let one = Head {
                q: &q,
                keys: &ks[at(g, 0)..at(g, positions)],
                values: &vs[at(g, 0)..at(g, positions)],
                allowed,
                positions,
                head_dim: d,
                scale: h.scale,
            };
            let o = &mut o[(r * n + g * group) * d..(r * n + (g + 1) * group) * d];
            head(&one, &mut scratch, o);
        }
    }
}

/// One row's attention for one kv head ([`Head`]) into `o` `[group, head_dim]`: scores by
/// `dot`, softmax and weighted sums in float32.
#[inline(always)]
fn head<T: Element>(
    h: &Head<'_, T>,
    s: &mut Scratch,
    o: &mut [T],
    dot: impl Fn(&[f32], &[f32]) -> f32,
) {
    let (d, positions) = (h.head_dim, h.positions);
    let group = h.q.len() / d;
    let (scores, totals, sum, row_f32) = (
        &mut s.scores[..group * positions],
        &mut s.totals[..group],
        &mut s.sum[..group * d],
        &mut s.row[..d],
    );
    for p in 0..positions {
        let open = h.allowed.is_none_or(|a| a[p] != 0);
        if open {
            widen(&h.keys[p * d..(p + 1) * d], row_f32);
        }
        for (j, q) in h.q.chunks_exact(d).enumerate() {
            scores[j * positions + p] = if open {
                dot(q, row_f32) * h.scale
            } else {
                f32::NEG_INFINITY
            };
        }
    }
    totals.fill(0.0);
    for (scores, total) in scores.chunks_exact_mut(positions).zip(totals.iter_mut()) {
        let max = scores.iter().fold(f32::NEG_INFINITY, |m, s| m.max(*s));
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            *total += *s;
        }
    }
    sum.fill(0.0);
    for p in 0..positions {
        if (0..group).all(|j| scores[j * positions + p] == 0.0) {
            continue;
        }
        widen(&h.values[p * d..(p + 1) * d], row_f32);
        for (j, sum) in sum.chunks_exact_mut(d).enumerate() {
            let s = scores[j * positions + p];
            if s != 0.0 {
                let weight = s / totals[j];
                for (o, v) in sum.iter_mut().zip(row_f32.iter()) {
                    *o += weight * v;
                }
            }
        }
    }
    for (o, v) in o.iter_mut().zip(sum.iter()) {
        *o = T::put(*v);
    }
}

/// `x` in float32.
#[inline(always)]
fn widen<T: Element>(x: &[T], out: &mut [f32]) {
    for (o, v) in out.iter_mut().zip(x) {
        *o = v.get();
    }
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
        assert_eq!(a.kind(), b.kind());
        let diff = (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
            .abs()
            .max();
        f64::try_from(diff).expect("scalar")
    }

    /// The largest difference each kind allows against the libtorch ops: float32's rounding,
    /// or one bfloat16 step of the values compared.
    fn tolerance(kind: Kind, scale: f64) -> f64 {
        match kind {
            Kind::BFloat16 => scale / 128.0,
            _ => 1e-5 * scale.max(1.0),
        }
    }

    #[test]
    fn bf16_rounding_is_halfs() {
        let specials = [
            0x7f7f_ffffu32, // the largest float32: rounds to infinity
            0x7f80_0000,    // infinity
            0xff80_0000,
            0x7fc0_0001, // NaNs
            0xffa0_0000,
            0x7f80_0001,
            0x3f80_8000, // ties: to even (down)
            0x3f81_8000, // (up)
            0x0000_8000,
            0x8000_0001,
        ];
        for x in (0..=u32::MAX).step_by(997).chain(specials) {
            let v = f32::from_bits(x);
            let (got, want) = (<bf16 as Element>::put(v), bf16::from_f32(v));
            assert_eq!(got.to_bits(), want.to_bits(), "{x:#010x}");
        }
    }

    #[test]
    fn argmax_rows_is_libtorchs() -> Result<()> {
        tch::manual_seed(3);
        for kind in [Kind::Float, Kind::BFloat16] {
            // One row, rows with a tail, and enough to split over two threads.
            for (rows, vocab) in [(1, 1), (1, 40), (3, 17), (5, 333), (8, 4099)] {
                // Rounded to a few values: many ties.
                let x = (randn(&[rows, vocab]) * 3.0).round().to_kind(kind);
                let want = Vec::<i64>::try_from(x.argmax(-1, false))?;
                assert_eq!(argmax_rows(&x)?, Some(want), "{kind:?} {rows}x{vocab}");
            }
            // A NaN (in a row's tail, and twice in a row), a row of -inf, a row all equal.
            let x = (randn(&[4, 35]) * 3.0).round();
            let _ = x.get(0).get(33).fill_(f64::NAN);
            let _ = x.get(1).get(7).fill_(f64::NAN);
            let _ = x.get(1).get(20).fill_(f64::NAN);
            let _ = x.get(2).fill_(f64::NEG_INFINITY);
            let _ = x.get(3).fill_(2.0);
            let x = x.to_kind(kind);
            let want = Vec::<i64>::try_from(x.argmax(-1, false))?;
            assert_eq!(want, [33, 7, 0, 0], "libtorch's own rule");
            assert_eq!(argmax_rows(&x)?, Some(want), "{kind:?}");
        }
        // Not taken: a non-contiguous view, a third dimension.
        let x = randn(&[4, 6]);
        assert_eq!(argmax_rows(&x.tr())?, None);
        assert_eq!(argmax_rows(&x.view([2, 2, 6]))?, None);
        Ok(())
    }

    #[test]
    fn rms_norm_matches_the_libtorch_ops() -> Result<()> {
        tch::manual_seed(0);
        for kind in [Kind::Float, Kind::BFloat16] {
            let (x, w) = (
                (randn(&[3, 1, 40]) * 3.0).to_kind(kind),
                randn(&[40]).to_kind(kind),
            );
            let eps = 1e-5;
            // Transformers' LlamaRMSNorm.
            let x32 = x.to_kind(Kind::Float);
            let variance = x32.square().mean_dim(-1, true, Kind::Float);
            let want = &w * (x32 * (variance + eps).rsqrt()).to_kind(kind);
            let got = rms_norm(&x, &w, eps)?;
            assert!(max_diff(&got, &want) <= tolerance(kind, 4.0), "{kind:?}");
        }
        Ok(())
    }

    #[test]
    fn silu_mul_matches_the_libtorch_ops() -> Result<()> {
        tch::manual_seed(1);
        for kind in [Kind::Float, Kind::BFloat16] {
            // One thread, and (8 x 1536 outputs) two.
            // (3 x 1537: the halves meet inside a row.)
            for (rows, inter) in [(2, 37), (8, 1536), (3, 1537)] {
                let both = (randn(&[rows, 1, 2 * inter]) * 4.0).to_kind(kind);
                let want = both.narrow(-1, 0, inter).silu() * both.narrow(-1, inter, inter);
                let got = silu_mul(&both)?;
                assert!(max_diff(&got, &want) <= tolerance(kind, 16.0), "{kind:?}");
            }
            const { assert!(3 * 1537 >= SILU_PARALLEL && 2 * 37 < SILU_PARALLEL) };
        }
        Ok(())
    }

    /// The kernel against rotary + libtorch's attention over the cache with the new key and
    /// value appended, for grouped heads, with no mask, a shared mask and per-row masks.
    #[test]
    fn decode_attention_matches_rotary_and_sdpa() -> Result<()> {
        // Row 0 sees everything, row 1 not position 1, row 2 only positions 3 and up.
        let per_row = [
            true, true, true, true, true, true, true, false, true, true, true, true, false, false,
            false, true, true, true,
        ];
        let shared = [false, true, true, true, true, true];
        // 20 dimensions: the portable body; 64 and 128: AVX-512's (where the CPU has it).
        for d in [20, 64, 128] {
            check_decode_attention(3, 9, 5, d, &shared, &per_row)?;
        }
        // Enough work to split the rows over two threads (3 rows: one and two).
        let (start, capacity) = (200usize, 210);
        assert!(3 * (start + 1) * 6 * 20 >= PARALLEL_WORK);
        let shared: Vec<bool> = (0..=start).map(|p| p % 7 != 3).collect();
        let per_row: Vec<bool> = (0..3 * (start + 1))
            .map(|i| (i % (start + 1)) >= 11 * (i / (start + 1)) && i % 5 != 2)
            .collect();
        for d in [20, 64] {
            check_decode_attention(3, capacity, start as i64, d, &shared, &per_row)?;
        }
        Ok(())
    }

    /// [`decode_attention`] of `batch` rows (6 heads in 2 kv groups of `d` dims) at position
    /// `start` against rotary + SDPA, with no mask, the `shared` one and the `per_row` ones.
    fn check_decode_attention(
        batch: i64,
        capacity: i64,
        start: i64,
        d: i64,
        shared: &[bool],
        per_row: &[bool],
    ) -> Result<()> {
        tch::manual_seed(2);
        let (n, kv) = (6i64, 2i64);
        let heads = DecodeHeads {
            heads: n as usize,
            kv_heads: kv as usize,
            head_dim: d as usize,
            scale: 0.3,
        };
        let per_row = Tensor::from_slice(per_row).view([batch, 1, 1, start + 1]);
        let shared = Tensor::from_slice(shared).view([1, 1, 1, start + 1]);
        for kind in [Kind::Float, Kind::BFloat16] {
            let qkv = randn(&[batch, 1, (n + 2 * kv) * d]).to_kind(kind);
            let angles = randn(&[batch, 1, 1, d / 2]).repeat([1, 1, 1, 2]);
            let (cos, sin) = (angles.cos().to_kind(kind), angles.sin().to_kind(kind));
            let cached = (
                randn(&[batch, kv, capacity, d]).to_kind(kind),
                randn(&[batch, kv, capacity, d]).to_kind(kind),
            );
            for mask in [None, Some(&shared), Some(&per_row)] {
                let (mut keys, mut values) = (cached.0.copy(), cached.1.copy());
                let step = DecodeStep {
                    qkv: &qkv,
                    cos: &cos,
                    sin: &sin,
                    allowed: mask,
                    start: start as usize,
                    heads,
                };
                let got = decode_attention(&step, &mut keys, &mut values)?;
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
                    max_diff(&keys, &want_keys) <= tolerance(kind, 0.0),
                    "the new key"
                );
                assert!(
                    max_diff(&values, &want_values) == 0.0,
                    "the new value, only"
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
                let diff = max_diff(&got, &want);
                assert!(diff <= tolerance(kind, 2.0), "{kind:?}: {diff}");
            }
        }
        Ok(())
    }

    /// The portable body (SSE2) and the AVX2 one give the same outputs and cache writes (the
    /// tests above run whichever this CPU takes).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn portable_avx2_and_avx512_bodies_agree() {
        if !(std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma"))
        {
            return;
        }
        // 24 dimensions: the portable body in each instruction set; 64: also AVX-512's own.
        for d in [24, 64] {
            bodies_agree(d);
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn bodies_agree(d: usize) {
        let (batch, n, kv, capacity, start) = (2, 4, 2, 7, 4);
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed * 104_729) % 1000) as f32 / 500.0) - 1.0)
                .collect()
        };
        let qkv = values(batch * (n + 2 * kv) * d, 1);
        let (cos, sin) = (values(batch * d, 2), values(batch * d, 3));
        let allowed = [1u8, 0, 1, 1, 1, 1, 1, 1, 0, 1];
        let step = Step {
            qkv: &qkv,
            cos: &cos,
            sin: &sin,
            allowed: Some(&allowed),
            start,
            heads: DecodeHeads {
                heads: n,
                kv_heads: kv,
                head_dim: d,
                scale: 0.2,
            },
        };
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let run = |body: &str| {
            let (mut keys, mut vals) = (
                values(batch * kv * capacity * d, 4),
                values(batch * kv * capacity * d, 5),
            );
            let mut out = vec![0f32; batch * n * d];
            let cache = Cache {
                keys: &mut keys,
                values: &mut vals,
                capacity,
            };
            match body {
                #[allow(unsafe_code)]
                // SAFETY: checked above.
                "avx2" => unsafe { attend_avx2(&step, cache, &mut out) },
                #[allow(unsafe_code)]
                // SAFETY: checked above.
                "avx512" => unsafe { attend_avx512(&step, cache, &mut out) },
                #[allow(unsafe_code)]
                // SAFETY: checked above; `d` is 64.
                "avx512 heads" => unsafe { attend_heads_avx512::<f32, 4>(&step, cache, &mut out) },
                _ => attend(&step, cache, &mut out, |h, s, o| head(h, s, o, dot)),
            }
            (out, keys, vals)
        };
        let portable = run("portable");
        let bodies: &[&str] = match (avx512, d) {
            (true, 64) => &["avx2", "avx512", "avx512 heads"],
            (true, _) => &["avx2", "avx512"],
            _ => &["avx2"],
        };
        for body in bodies {
            let simd = run(body);
            assert_eq!(portable.1, simd.1, "{body}: the same key written");
            assert_eq!(portable.2, simd.2, "{body}: the same value written");
            // The same sums in another order, and a polynomial exp, for AVX-512's own body.
            let tolerance = if *body == "avx512 heads" { 1e-5 } else { 1e-6 };
            for (a, b) in portable.0.iter().zip(&simd.0) {
                assert!((a - b).abs() < tolerance, "{body}: {a} vs {b}");
            }
        }
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
        let mut step = DecodeStep {
            qkv: &qkv,
            cos: &table,
            sin: &table,
            allowed: None,
            start: 3,
            heads,
        };
        // Position 3 is past the capacity of 3.
        let out = decode_attention(&step, &mut keys, &mut values);
        assert!(matches!(out, Err(Error::Kernel(_))));
        step.start = 2;
        assert!(decode_attention(&step, &mut keys, &mut values).is_ok());
    }

    #[test]
    fn only_plain_decoding_sized_tensors_apply() {
        let x = randn(&[2, 1, 8]);
        assert!(applies(&x, &[&randn(&[8])]));
        assert!(applies(&randn(&[2, 8]), &[]));
        assert!(applies(&x.to_kind(Kind::BFloat16), &[]));
        assert!(!applies(&randn(&[65, 8]), &[]), "too many rows");
        assert!(!applies(&randn(&[1, 2, 8]), &[]), "a prompt");
        assert!(!applies(&x.to_kind(Kind::Half), &[]));
        assert!(
            !applies(&x, &[&randn(&[8]).to_kind(Kind::BFloat16)]),
            "mixed kinds"
        );
        assert!(!applies(&randn(&[8, 2]).tr(), &[]), "not contiguous");
        assert!(!applies(&x, &[&randn(&[8]).set_requires_grad(true)]));
    }
}
