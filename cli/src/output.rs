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
