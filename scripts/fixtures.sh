#!/usr/bin/env bash
# Makes the test fixtures (tests/fixtures/generated/, not committed) with their generator
# scripts, again only when a generator or the venv's requirements change.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="$root/.venv/bin/python"

make_fixture() { # generator output-dir [other inputs...]
    local generator="$1" out="$2"
    shift 2
    local want
    want="$(cat "$generator" "$@" scripts/requirements.txt | sha256sum | cut -d' ' -f1)"
    if [ "$(cat "$out/.stamp" 2>/dev/null)" != "$want" ]; then
        printf 'fixtures: %s\n' "$generator" >&2
        "$python" "$generator" --out "$out" >/dev/null
        printf '%s\n' "$want" >"$out/.stamp"
    fi
}

make_fixture tests/fixtures/lm/make_fixtures.py tests/fixtures/generated/lm
make_fixture tests/fixtures/reward/make_reward_fixtures.py tests/fixtures/generated/reward \
    tests/fixtures/lm/make_fixtures.py
make_fixture tests/fixtures/value/make_value_fixtures.py tests/fixtures/generated/value
# The GGUF fixtures include SmolLM2-135M-Instruct's references once the set-up has its file.
smollm2=()
[ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ] && smollm2=(models/SmolLM2-135M-Instruct.Q4_1.gguf)
make_fixture tests/fixtures/gguf/make_gguf_fixtures.py tests/fixtures/generated/gguf "${smollm2[@]}"
make_fixture tests/fixtures/gguf/make_tokenizer_fixtures.py tests/fixtures/generated/gguf-tokenizer \
    "${smollm2[@]}"
