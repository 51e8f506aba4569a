#!/usr/bin/env bash
# Idempotent set-up: system packages, the project venv (.venv) with libtorch and ONNX Runtime,
# and the link through which cargo and the built binaries find them. A second run takes seconds.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
log() { printf 'setup: %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }

# System packages: HDF5 (rollout store) and pkg-config (to find it).
missing=()
for pkg in libhdf5-dev pkg-config; do
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
