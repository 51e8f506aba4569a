//! Records the git revision the binary is built from (`RECONTROL_GIT_REVISION`), and keeps
//! `libtorch_cuda` a dependency of the `recontrol` binary (and this crate's tests).
//!
//! Nothing calls into `libtorch_cuda` directly: its kernels register themselves when the library
//! is loaded. The linker's default `--as-needed` therefore drops it, and CUDA then looks absent
//! at run time. CPU-only libtorch builds have no such library and need nothing.
use std::path::Path;

fn main() {
    git_revision();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        if Path::new(&dir).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}

fn git_revision() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for path in [".git/HEAD", ".git/index"] {
        println!("cargo:rerun-if-changed={}", root.join(path).display());
    }
    let revision = std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(&root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned());
    let dirty = std::process::Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .current_dir(&root)
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    let suffix = if dirty { "-dirty" } else { "" };
    println!("cargo:rustc-env=RECONTROL_GIT_REVISION={revision}{suffix}");
}
