#!/usr/bin/env bash
# The main job: set-up, a release build, then `recontrol demo` (the whole RE-Control pipeline
# on the embedded default, on the CPU) into runs/demo. Extra arguments go to `recontrol demo`
# (e.g. --out DIR, --config FILE, --device cuda:0). A second run skips unchanged stages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
cargo build --release --locked -p recontrol-cli
target/release/recontrol demo "$@"
