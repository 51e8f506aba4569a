#!/usr/bin/env bash
# The main job. Until `recontrol demo` exists (the demo issue), it generates with one of the
# tiny HF test models: set-up, a release build, then `recontrol generate`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
scripts/fixtures.sh
cargo build --release --locked -p recontrol-cli
mkdir -p runs/demo
target/release/recontrol generate \
    --model tests/fixtures/generated/lm/llama3-gqa \
    --prompt $'\n\nHuman: What is the capital of France?\n\nAssistant:' \
    --prompt $'\n\nHuman: How do I make tea?\n\nAssistant:' \
    --max-new-tokens 32 --out runs/demo/generations.jsonl "$@"
cat runs/demo/generations.jsonl
