//! Two pieces of work at once on libtorch's own OpenMP threads.
//!
//! libtorch (PyPI's Linux build) runs its threaded ops on libgomp's team, whose workers spin
//! for a while after each op. A thread of our own started beside them competes with a
//! spinning worker for the second core (measured: a decoding step's attention split over a
//! scoped thread made rollouts 5-15% slower). Running the second piece on the team itself
//! uses the worker that is already spinning. libgomp's entry point is found at run time in
//! the process (`GOMP_parallel`, which Intel's OpenMP runtime also exports); where it is
//! absent the two pieces run one after the other.

use std::ffi::{c_int, c_uint, c_void};
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

type Body = unsafe extern "C" fn(*mut c_void);
type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
type ThreadNum = unsafe extern "C" fn() -> c_int;

/// The OpenMP runtime's entry points.
struct Runtime {
    parallel: Parallel,
    thread_num: ThreadNum,
}

/// The OpenMP runtime loaded in this process, if any.
fn runtime() -> Option<&'static Runtime> {
    static RUNTIME: OnceLock<Option<Runtime>> = OnceLock::new();
    RUNTIME.get_or_init(find).as_ref()
}

#[cfg(unix)]
#[allow(unsafe_code)]
fn find() -> Option<Runtime> {
    // SAFETY: dlsym with RTLD_DEFAULT only looks symbols up; the names are NUL-terminated.
    let (parallel, thread_num) = unsafe {
        (
            libc::dlsym(libc::RTLD_DEFAULT, c"GOMP_parallel".as_ptr()),
            libc::dlsym(libc::RTLD_DEFAULT, c"omp_get_thread_num".as_ptr()),
        )
    };
    if parallel.is_null() || thread_num.is_null() {
        return None;
    }
    // SAFETY: both symbols are the OpenMP ABI's functions of these signatures (libgomp's
    // `void GOMP_parallel(void (*)(void *), void *, unsigned, unsigned)` and
    // `int omp_get_thread_num(void)`).
    unsafe {
        Some(Runtime {
            parallel: std::mem::transmute::<*mut c_void, Parallel>(parallel),
            thread_num: std::mem::transmute::<*mut c_void, ThreadNum>(thread_num),
        })
    }
}

#[cfg(not(unix))]
fn find() -> Option<Runtime> {
    None
}

/// The two pieces and what became of them, shared with the team's threads.
struct Pieces<A, B> {
    first: Mutex<Option<A>>,
    second: Mutex<Option<B>>,
    /// The first panic of either piece, raised again on the caller's thread.
    panic: Mutex<Option<Box<dyn std::any::Any + Send>>>,
    thread_num: ThreadNum,
}

impl<A: FnOnce(), B: FnOnce()> Pieces<A, B> {
    /// Runs the piece of team thread `t` (0: the first, 1: the second), if still pending.
    fn run(&self, t: c_int) {
        let outcome = match t {
            0 => take(&self.first).map(|f| catch_unwind(AssertUnwindSafe(f))),
            1 => take(&self.second).map(|f| catch_unwind(AssertUnwindSafe(f))),
            _ => None,
        };
        if let Some(Err(payload)) = outcome {
            self.panic
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(payload);
        }
    }
}

fn take<F>(slot: &Mutex<Option<F>>) -> Option<F> {
    slot.lock().unwrap_or_else(|e| e.into_inner()).take()
}

#[allow(unsafe_code)]
unsafe extern "C" fn body<A: FnOnce(), B: FnOnce()>(data: *mut c_void) {
    // SAFETY: `data` is the `Pieces<A, B>` that `join` keeps alive until the team has
    // finished (`GOMP_parallel` returns only then).
    let pieces = unsafe { &*(data as *const Pieces<A, B>) };
    // SAFETY: called on a thread of the team, as OpenMP allows.
    let t = unsafe { (pieces.thread_num)() };
    pieces.run(t);
}

/// Runs `first` and `second`, at once when libtorch's OpenMP team can take the second
/// (libtorch set to two threads or more), else one after the other; returns when both are
/// done. A panic in either is raised again here.
pub(crate) fn join<A, B>(first: A, second: B)
where
    A: FnOnce() + Send,
    B: FnOnce() + Send,
{
    let Some(rt) = runtime().filter(|_| tch::get_num_threads() >= 2) else {
        first();
        second();
        return;
    };
    let pieces = Pieces {
        first: Mutex::new(Some(first)),
        second: Mutex::new(Some(second)),
        panic: Mutex::new(None),
        thread_num: rt.thread_num,
    };
    let data = &pieces as *const Pieces<A, B> as *mut c_void;
    #[allow(unsafe_code)]
    // SAFETY: `body::<A, B>` reads `data` as the `Pieces<A, B>` above, which outlives the
    // call; each piece runs at most once (taken out of its mutex), and both are `Send`.
    unsafe {
        (rt.parallel)(body::<A, B>, data, 2, 0)
    };
    // A team of one thread ran only the first piece.
    pieces.run(1);
    pieces.run(0);
    if let Some(payload) = take(&pieces.panic) {
        resume_unwind(payload);
    }
}

/// Runs `work` over `0..items` in ranges that the two threads of [`join`] claim as they go,
/// each claim a quarter of what is left (at least one item): where the halves of a fixed
/// split finished apart (one core slowed by its neighbours on the host), the first thread
/// done now takes from the other's share. Returns when every item is done.
pub(crate) fn share(items: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
    let next = AtomicUsize::new(0);
    let claim = || {
        let mut start = next.load(Ordering::Relaxed);
        loop {
            if start >= items {
                return None;
            }
            let end = start + ((items - start) / 4).max(1);
            match next.compare_exchange_weak(start, end, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return Some(start..end),
                Err(now) => start = now,
            }
        }
    };
    let run = || {
        while let Some(range) = claim() {
            work(range);
        }
    };
    join(run, run);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_pieces_run_once_and_write_their_own_halves() {
        let mut out = vec![0u32; 1000];
        for round in 1..=50u32 {
            let (a, b) = out.split_at_mut(500);
            join(
                || a.iter_mut().for_each(|x| *x += round),
                || b.iter_mut().for_each(|x| *x += 2 * round),
            );
        }
        let total: u32 = (1..=50).sum();
        assert!(out[..500].iter().all(|&x| x == total));
        assert!(out[500..].iter().all(|&x| x == 2 * total));
    }

    #[test]
    fn shared_items_are_each_done_once() {
        for items in [0, 1, 2, 7, 1000] {
            let done: Vec<AtomicUsize> = (0..items).map(|_| AtomicUsize::new(0)).collect();
            share(items, |range| {
                for i in range {
                    done[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            assert!(
                done.iter().all(|d| d.load(Ordering::Relaxed) == 1),
                "{items}"
            );
        }
    }

    #[test]
    fn the_pieces_run_on_two_threads() {
        let _ = tch::Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        if runtime().is_none() || tch::get_num_threads() < 2 {
            return;
        }
        let (mut a, mut b) = (None, None);
        join(
            || a = Some(std::thread::current().id()),
            || b = Some(std::thread::current().id()),
        );
        assert!(a.is_some() && b.is_some());
        assert_ne!(a, b, "both pieces ran on one thread");
    }

    #[test]
    fn the_runtime_is_libtorchs() {
        // Any libtorch op loads the OpenMP runtime; PyPI's Linux libtorch links libgomp.
        let _ = tch::Tensor::zeros([2], (tch::Kind::Float, tch::Device::Cpu));
        if cfg!(target_os = "linux") {
            assert!(
                runtime().is_some(),
                "no OpenMP runtime found in the process"
            );
        }
    }

    #[test]
    fn a_panic_in_a_piece_is_raised_in_the_caller() {
        let caught = catch_unwind(|| join(|| (), || panic!("second piece")));
        let payload = caught.expect_err("the panic reaches the caller");
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"second piece"));
    }
}
