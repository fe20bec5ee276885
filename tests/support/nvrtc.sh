#!/usr/bin/env bash
# nvrtc.sh — provide NVRTC (CUDA's run-time compiler, a plain library that
# needs no GPU) so the tests can check that every CUDA kernel compiles.
#
# Installs the nvidia-cuda-nvrtc Python package, pinned to the CUDA version
# the device machines' driver runs (13.0), with `python3 -m pip install
# --target` into "${PARALLM_HOME:-$HOME/.cache/parallm}/nvrtc-13.0", once.
# Concurrent runs are serialised with flock.
#
# Output: the last line of stdout is the directory holding libnvrtc.so.13
# (for LD_LIBRARY_PATH); everything else goes to stderr. Non-zero exit with a
# message on failure.
set -euo pipefail

VERSION="13.0.*"
PARALLM_HOME="${PARALLM_HOME:-$HOME/.cache/parallm}"
DEST="$PARALLM_HOME/nvrtc-13.0"
LIB="$DEST/nvidia/cu13/lib"

log() { printf 'nvrtc: %s\n' "$*" >&2; }

mkdir -p "$PARALLM_HOME"
exec 9>"$PARALLM_HOME/nvrtc.lock"
flock -w "${PARALLM_INSTALL_LOCK_WAIT:-900}" 9 || { log "ERROR: timed out waiting for the install lock"; exit 1; }

if [ ! -e "$LIB/libnvrtc.so.13" ]; then
    log "installing nvidia-cuda-nvrtc==$VERSION into $DEST"
    rm -rf "$DEST.tmp"
    python3 -m pip install --quiet --no-deps --disable-pip-version-check \
        --target "$DEST.tmp" "nvidia-cuda-nvrtc==$VERSION" >&2
    rm -rf "$DEST"
    mv "$DEST.tmp" "$DEST"
fi
[ -e "$LIB/libnvrtc.so.13" ] || { log "ERROR: $LIB/libnvrtc.so.13 is missing after the install"; exit 1; }
echo "$LIB"
