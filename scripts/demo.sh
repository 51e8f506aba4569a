#!/usr/bin/env bash
# The main job: set-up (which fetches SmolLM2-135M-Instruct's GGUF), a release build, the
# model's import into models/smollm2-135m-instruct (once), then `recontrol demo` (the whole
# RE-Control pipeline on it, on the CPU) into runs/demo. Extra arguments go to `recontrol demo`
# (e.g. --out DIR, --config FILE, --device cuda:0). A second run skips unchanged stages.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
cargo build --release --locked -p recontrol-cli
target/release/recontrol lm import-gguf models/SmolLM2-135M-Instruct.Q4_1.gguf \
    --out models/smollm2-135m-instruct
target/release/recontrol demo "$@"
