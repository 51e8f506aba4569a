//! What the binary adds to `recontrol_io`: its provenance (the git revision comes from the build
//! script) and the flag name on errors of the `--out` sink.

use std::path::Path;

use recontrol_io::{JsonlSink, Provenance};

/// Version, git revision and command line of this binary, for run records.
pub fn provenance() -> Provenance {
    Provenance {
        recontrol_version: env!("CARGO_PKG_VERSION").to_owned(),
        git_revision: env!("RECONTROL_GIT_REVISION").to_owned(),
        command_line: std::env::args().collect(),
    }
}

/// The sink of a command's `--out` (standard output without one). Errors read
/// `--out FILE: folder DIR does not exist`: the flag, then the error and its causes.
pub fn jsonl_out(out: Option<&Path>) -> anyhow::Result<JsonlSink> {
    JsonlSink::create(out).map_err(|e| {
        let mut message = format!("--out {e}");
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            message.push_str(&format!(": {c}"));
            cause = c.source();
        }
        anyhow::anyhow!(message)
    })
}

/// The flags that change how a resumable run runs, not what it makes.
const RUN_FLAGS: [&str; 5] = [
    "resume",
    "max_steps_per_run",
    "max_epochs_per_run",
    "logdir",
    "device",
];

/// Whether the complete output `out` of a training command resumed with `--resume` (a
/// requeued job that had finished) is a no-op: `Ok(true)` when `out` exists and its record
/// `record` (a file in `out`) holds, at the JSON `pointer`, the same flags as `args` but for
/// [`RUN_FLAGS`]; an output made with other flags is refused. `Ok(false)` when there is no
/// output yet; without `resume` an existing output is refused.
pub fn already_complete(
    out: &Path,
    resume: bool,
    record: &str,
    pointer: &str,
    args: &impl serde::Serialize,
) -> anyhow::Result<bool> {
    if !recontrol_io::already_complete(out, resume).map_err(|e| anyhow::anyhow!("--out {e}"))? {
        return Ok(false);
    }
    let path = out.join(record);
    let without_run_flags = |mut value: serde_json::Value| {
        if let Some(map) = value.as_object_mut() {
            for flag in RUN_FLAGS {
                map.remove(flag);
            }
        }
        value
    };
    let text = std::fs::read_to_string(&path)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", path.display()))?;
    let saved: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("--out {}: {e}", path.display()))?;
    let saved = saved.pointer(pointer).cloned().unwrap_or_default();
    if without_run_flags(saved) != without_run_flags(serde_json::to_value(args)?) {
        anyhow::bail!(
            "--out {}: complete, but made with other flags ({}); remove it or choose another name",
            out.display(),
            path.display()
        );
    }
    eprintln!("--out {}: already complete; nothing to do", out.display());
    Ok(true)
}
