#!/usr/bin/env bash
# Every check CI runs, on a fresh machine too: set-up, fixtures, format, lints, all tests.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/fixtures.sh
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# A one-node Slurm cluster for cli/tests/slurm.rs; where it cannot start, those tests print why
# they skip (with it up, RECONTROL_REQUIRE_SLURM makes them fail rather than skip).
slurm_dir="$root/target/slurm-local"
if exports="$(scripts/slurm-local.sh start "$slurm_dir")"; then
    eval "$exports"
    export RECONTROL_REQUIRE_SLURM=1
    trap 'scripts/slurm-local.sh stop "$slurm_dir"' EXIT
else
    echo "test.sh: no local Slurm cluster (reason above): the Slurm tests will skip" >&2
fi
cargo test --workspace --locked
