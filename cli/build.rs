//! Keeps `libtorch_cuda` a dependency of the `recontrol` binary (and this crate's tests).
//!
//! Nothing calls into `libtorch_cuda` directly: its kernels register themselves when the library
//! is loaded. The linker's default `--as-needed` therefore drops it, and CUDA then looks absent
//! at run time. CPU-only libtorch builds have no such library and need nothing.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
