//! Layer weights packed for the CPU's matrix libraries, for decoding: MKL's packed float32
//! products (`mkl::_mkl_linear`, the format of `cblas_sgemm_pack`) and oneDNN's packed
//! bfloat16 products (`mkldnn::_linear_pointwise`, AMX where the CPU has it). With a few rows
//! (decoding batches of 2 to 64; bfloat16 from 1) they run up to 2.4x faster than the plain
//! product (8 rows by SmolLM2's 49k-row LM head). `tch` binds neither op; libtorch exports
//! both through AOTInductor's C shim (`aoti_torch_cpu__mkl_linear`,
//! `aoti_torch_cpu__linear_pointwise`, and `aoti_torch_call_dispatcher` for the packing),
//! whose tensor handles are `at::Tensor*` as `tch`'s are. MKL's pack serves one row count,
//! oneDNN's any. Where [`crate::tiled`] runs for their kind, weights take its layout instead:
//! bfloat16 ones on CPUs with AVX-512 or AVX2 and no AMX, for every product, prompts
//! included; float32 ones on CPUs other than Intel's, for decoding steps.

// Outside x86-64 only `PackedWeight` and its plain fallback remain.
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

use std::ffi::{c_char, CStr};
use std::sync::{Mutex, OnceLock};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::error::{Error, Result};
use crate::kernels::decoding_rows;
use crate::tiled::{self, TiledWeight};

// MKL, and these shim functions with it, are in x86-64 builds of libtorch; elsewhere
// decoding takes the plain products.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
extern "C" {
    fn aoti_torch_call_dispatcher(
        op: *const c_char,
        overload: *const c_char,
        stack: *mut u64,
    ) -> i32;
    fn aoti_torch_cpu__mkl_linear(
        x: *mut C_tensor,
        packed: *mut C_tensor,
        origin: *mut C_tensor,
        bias: *mut *mut C_tensor,
        prepack_batch_size: i64,
        ret: *mut *mut C_tensor,
    ) -> i32;
    #[allow(clippy::too_many_arguments)]
    fn aoti_torch_cpu__linear_pointwise(
        x: *mut C_tensor,
        packed: *mut C_tensor,
        bias: *mut *mut C_tensor,
        attr: *const c_char,
        scalars: *const *const f64,
        scalars_len: i64,
        algorithm: *const *const c_char,
        ret: *mut *mut C_tensor,
    ) -> i32;
}

#[cfg(target_arch = "x86_64")]
/// A new owning handle of `t` (the dispatcher's stack takes ownership of its tensors).
fn owned_handle(t: &Tensor) -> u64 {
    let clone = t.shallow_clone();
    let handle = clone.as_ptr() as u64;
    std::mem::forget(clone);
    handle
}

#[cfg(target_arch = "x86_64")]
/// The packed form of `weight` `[out, in]` for products with `rows` rows: float32 (MKL,
/// for that row count only) or bfloat16 (oneDNN, any row count).
#[allow(unsafe_code)]
fn pack(weight: &Tensor, rows: i64) -> Result<Tensor> {
    let weight = weight.f_contiguous()?;
    let (op, overload): (&CStr, &CStr) = match weight.kind() {
        Kind::Float => (c"mkl::_mkl_reorder_linear_weight", c""),
        Kind::BFloat16 => (c"mkldnn::_reorder_linear_weight", c""),
        kind => return Err(Error::Kernel(format!("no packed product for {kind:?}"))),
    };
    // (Tensor, int) for MKL, (Tensor, int?) for oneDNN: an int? holding a value is a pointer
    // the callee frees, so oneDNN gets none (the row count is only its hint).
    let mut stack = [
        owned_handle(&weight),
        if weight.kind() == Kind::Float {
            rows as u64
        } else {
            0
        },
    ];
    // SAFETY: the op names are NUL-terminated; the stack holds the op's arguments as the shim
    // encodes them (an owning tensor handle, which the call consumes, and an int64 or none)
    // and receives its one result, a new owning handle.
    let status =
        unsafe { aoti_torch_call_dispatcher(op.as_ptr(), overload.as_ptr(), stack.as_mut_ptr()) };
    if status != 0 || stack[0] == 0 {
        return Err(Error::Kernel(format!("{op:?} failed (status {status})")));
    }
    // SAFETY: a new `at::Tensor*` the dispatcher allocated for us, adopted once.
    Ok(unsafe { Tensor::from_ptr(stack[0] as *mut C_tensor) })
}

#[cfg(target_arch = "x86_64")]
/// Whether oneDNN packs bfloat16 weights on this CPU, found once by packing a small one:
/// it needs AVX-512 (BW, VL, DQ), AVX-NE-CONVERT or AMX, and refuses elsewhere (an AVX2
/// CPU such as AMD's Zen 3, where bfloat16 decoding then takes the tiled products, or
/// libtorch's plain ones for shapes they do not fit).
fn onednn_bfloat16() -> bool {
    static PACKS: OnceLock<bool> = OnceLock::new();
    *PACKS.get_or_init(|| {
        let probe = Tensor::ones([16, 16], (Kind::BFloat16, Device::Cpu));
        pack(&probe, 1).is_ok()
    })
}

#[cfg(target_arch = "x86_64")]
/// `x W^T` with `packed` from [`pack`] (`origin` the `[out, in]` weight it was packed from,
/// `rows` its row count).
#[allow(unsafe_code)]
fn packed_product(x: &Tensor, packed: &Tensor, origin: &Tensor, rows: i64) -> Result<Tensor> {
    let mut out: *mut C_tensor = std::ptr::null_mut();
    let (x_ptr, packed_ptr) = (
        x.as_ptr() as *mut C_tensor,
        packed.as_ptr() as *mut C_tensor,
    );
    // SAFETY: borrowed handles of live tensors (the shim functions do not take ownership of
    // their inputs), no bias (a null optional), and one output handle, new and owning.
    let status = unsafe {
        match packed.kind() {
            Kind::Float => aoti_torch_cpu__mkl_linear(
                x_ptr,
                packed_ptr,
                origin.as_ptr() as *mut C_tensor,
                std::ptr::null_mut(),
                rows,
                &mut out,
            ),
            _ => aoti_torch_cpu__linear_pointwise(
                x_ptr,
                packed_ptr,
                std::ptr::null_mut(),
                c"none".as_ptr(),
                std::ptr::null(),
                0,
                std::ptr::null(),
                &mut out,
            ),
        }
    };
    if status != 0 || out.is_null() {
        return Err(Error::Kernel(format!(
            "packed product of {:?} {:?} failed (status {status})",
            x.size(),
            x.kind()
        )));
    }
    // SAFETY: a new `at::Tensor*` from the shim, adopted once.
    Ok(unsafe { Tensor::from_ptr(out) })
}

/// Consecutive products at a new row count after which a float32 weight is packed again
/// for it: a batch size that stays (a last, smaller batch of prompts) gets its pack, one
/// that changes every step does not make every step pack.
const REPACK_AFTER: u32 = 16;

#[derive(Debug, Default)]
struct State {
    /// The pack and the row count it serves (any, for bfloat16).
    packed: Option<(i64, Tensor)>,
    /// A row count the pack does not serve and how many products in a row asked for it.
    other: Option<(i64, u32)>,
}

/// `x W^T` of a fixed weight for decoding-sized `x` (up to 64 rows) by the products
/// generation uses ([`PackedWeight`]: the tiles or a packed form, whichever this CPU's policy
/// takes), libtorch's `linear` where none applies (another device, gradients, more rows).
/// For other crates' small matrices: the controller's value MLP.
#[derive(Debug)]
pub struct DecodingProduct(PackedWeight);

impl DecodingProduct {
    /// For `weight` `[out, in]` (any strides).
    pub fn new(weight: &Tensor) -> Self {
        Self(PackedWeight::new(weight.shallow_clone()))
    }

    /// `x W^T`, `x` `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.0.product(x)? {
            Some(y) => Ok(y),
            None => Ok(x.f_linear(&self.0.weight, None::<&Tensor>)?),
        }
    }
}

/// A layer matrix with its packed form, made on its first decoding product.
#[derive(Debug)]
pub(crate) struct PackedWeight {
    /// `[out, in]` (a view of the layer's weight).
    weight: Tensor,
    state: Mutex<State>,
    /// The weight in the tiled products' layout where they take its kind ([`tiled::isa`]),
    /// made on the first product; `None` inside when its shape does not fit them.
    tiled: OnceLock<Option<TiledWeight>>,
}

impl PackedWeight {
    /// For `weight` `[out, in]` (any strides).
    pub(crate) fn new(weight: Tensor) -> Self {
        Self {
            weight,
            state: Mutex::default(),
            tiled: OnceLock::new(),
        }
    }

    /// `x W^T` on the CPU for a decoding step `x` ([`decoding_rows`]: `[batch, 1, in]` or
    /// `[batch, in]`) of at least 2 rows in float32 (1 where the tiled products take float32)
    /// and 1 in bfloat16 (where oneDNN packs bfloat16 weights: [`onednn_bfloat16`]), and for
    /// any bfloat16 `x` `[..., in]` where the tiled products take bfloat16 ([`tiled::isa`]);
    /// `None` for any other input, or while the pack serves another row count.
    #[cfg(target_arch = "x86_64")]
    pub(crate) fn product(&self, x: &Tensor) -> Result<Option<Tensor>> {
        let weight = &self.weight;
        let kind = x.kind();
        if x.device() != Device::Cpu
            || !matches!(kind, Kind::Float | Kind::BFloat16)
            || weight.kind() != kind
            || x.requires_grad()
            || weight.requires_grad()
        {
            return Ok(None);
        }
        // bfloat16 tiles take prompts too; float32 ones decoding steps (prompts keep
        // libtorch's products, threaded over many rows).
        let tiles = kind == Kind::BFloat16 || decoding_rows(x).is_some();
        if tiles && tiled::isa(kind).is_some() {
            if self.tiled.get().is_none() {
                // Two threads may both make it; one keeps its copy.
                let _ = self.tiled.set(TiledWeight::new(weight)?);
            }
            if let Some(tiled) = self.tiled.get().and_then(Option::as_ref) {
                return Ok(Some(tiled.product(x)?));
            }
        }
        if kind == Kind::BFloat16 && !onednn_bfloat16() {
            return Ok(None);
        }
        // MKL's packed product of one row is slower than its plain one (a matrix-vector
        // product at memory speed); oneDNN's is not.
        let fewest = if kind == Kind::Float { 2 } else { 1 };
        let rows = match decoding_rows(x) {
            Some(rows) if rows >= fewest => rows,
            _ => return Ok(None),
        };
        let packed = {
            let mut state = self
                .state
                .lock()
                .map_err(|_| Error::Kernel("a packing thread panicked".into()))?;
            let serves = |r: i64| kind == Kind::BFloat16 || r == rows;
            let current = state.packed.as_ref().map(|(r, p)| (*r, p.shallow_clone()));
            match current {
                Some((r, p)) if serves(r) => {
                    state.other = None;
                    p
                }
                current => {
                    let asked = match state.other {
                        Some((r, n)) if r == rows => n + 1,
                        _ => 1,
                    };
                    if current.is_some() && asked < REPACK_AFTER {
                        state.other = Some((rows, asked));
                        return Ok(None);
                    }
                    let p = pack(weight, rows)?;
                    state.packed = Some((rows, p.shallow_clone()));
                    state.other = None;
                    p
                }
            }
        };
        let y = packed_product(&x.f_contiguous()?, &packed, weight, rows)?;
        Ok(Some(y))
    }

    /// No packed products outside x86-64: the plain ones.
    #[cfg(not(target_arch = "x86_64"))]
    pub(crate) fn product(&self, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use crate::kernels::MAX_ROWS;

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.size(), b.size());
        f64::try_from(
            (a.to_kind(Kind::Float) - b.to_kind(Kind::Float))
                .abs()
                .max(),
        )
        .expect("max")
    }

    #[test]
    fn float32_packs_serve_their_row_count_and_match_linear() -> Result<()> {
        tch::manual_seed(0);
        let weight = Tensor::randn([40, 24], (Kind::Float, Device::Cpu));
        // Stored [in, out] as the CPU layout does: the pack reads the transposed view.
        let packed = PackedWeight::new(weight.tr().contiguous().tr());
        let x = Tensor::randn([3, 1, 24], (Kind::Float, Device::Cpu));
        let y = packed.product(&x)?.expect("a decoding product");
        assert!(max_diff(&y, &x.linear(&weight, None::<&Tensor>)) < 1e-5);
        let two = Tensor::randn([2, 24], (Kind::Float, Device::Cpu));
        for _ in 1..REPACK_AFTER {
            assert!(packed.product(&two)?.is_none(), "the pack serves 3 rows");
        }
        let y = packed.product(&two)?.expect("packed again for 2 rows");
        assert!(max_diff(&y, &two.linear(&weight, None::<&Tensor>)) < 1e-5);
        assert!(packed.product(&x)?.is_none(), "now it serves 2");
        for x in [
            Tensor::randn([1, 2, 24], (Kind::Float, Device::Cpu)),
            Tensor::randn([MAX_ROWS as i64 + 1, 24], (Kind::Float, Device::Cpu)),
            Tensor::randn([2, 24], (Kind::Double, Device::Cpu)),
            Tensor::randn([1, 24], (Kind::Float, Device::Cpu)),
        ] {
            assert!(
                packed.product(&x)?.is_none(),
                "{:?} {:?}",
                x.size(),
                x.kind()
            );
        }
        Ok(())
    }

    #[test]
    fn bfloat16_packs_serve_any_row_count() -> Result<()> {
        tch::manual_seed(1);
        // 40 output features: not the tiled products' shape, so oneDNN's pack or none.
        let weight = Tensor::randn([40, 24], (Kind::BFloat16, Device::Cpu));
        let packed = PackedWeight::new(weight.shallow_clone());
        if !onednn_bfloat16() {
            // An AVX2 CPU: no pack, the caller's plain product (not an error).
            let x = Tensor::randn([5, 1, 24], (Kind::BFloat16, Device::Cpu));
            assert!(packed.product(&x)?.is_none());
            eprintln!("skipped: oneDNN packs no bfloat16 weights on this CPU");
            return Ok(());
        }
        for rows in [1, 5, 8] {
            let x = Tensor::randn([rows, 1, 24], (Kind::BFloat16, Device::Cpu));
            let y = packed.product(&x)?.expect("one pack for every row count");
            let want = x.linear(&weight, None::<&Tensor>);
            assert_eq!(y.kind(), Kind::BFloat16);
            assert!(max_diff(&y, &want) <= 0.05 * f64::try_from(want.abs().max())?);
        }
        Ok(())
    }
}
