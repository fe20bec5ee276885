#!/usr/bin/env bash
# python-env.sh — provide a Python virtualenv with the official `openai` client,
# the `gguf` package (with numpy) and `jsonschema`.
#
# Called by parallm's Rust integration tests (cargo test --release --workspace)
# to get an interpreter for tests/support/openai_client.py, which drives
# parallm's OpenAI-compatible HTTP API with the real client library, and for
# tests/support/family_models.py, which writes the tiny models of each family
# with llama.cpp's own GGUF writer. Can also be run by hand.
#
# Other environments (tests/support/lm-eval-env.sh) reuse this script with
# PARALLM_PYENV_NAME (the venv's directory name, default pyenv) and
# PARALLM_PYENV_PACKAGES (pinned `name==version` specs; extras allowed).
#
# Behaviour:
#   * venv lives at "${PARALLM_HOME:-$HOME/.cache/parallm}/pyenv"; it is
#     (re)created only if missing or broken (its python does not run, or has
#     no pip).
#   * installs $PACKAGES into it with `python -m pip`, only if those exact
#     versions are not already installed.
#   * the base interpreter is $PARALLM_PYTHON, else `python3` on PATH. If its
#     venv module cannot bootstrap pip (Debian without python3-venv), the
#     Debian package python3-venv is installed (root or `sudo -n`) and the
#     venv creation is retried.
#   * concurrent runs are serialised with flock on "$PARALLM_HOME/pyenv.lock".
#
# Output: the last (and only) line of stdout is the absolute path of the venv's
# python; all other output goes to stderr. Non-zero exit with a message on
# failure.
set -euo pipefail

# Pinned: the tiny models' bytes (and so the golden file's SHA-256) depend
# on the gguf writer's version.
PACKAGES="${PARALLM_PYENV_PACKAGES:-openai==3.54.0 gguf==0.19.0 jsonschema==4.26.0}"
NAME="${PARALLM_PYENV_NAME:-pyenv}"

PARALLM_HOME="${PARALLM_HOME:-$HOME/.cache/parallm}"
VENV="$PARALLM_HOME/$NAME"
VPY="$VENV/bin/python"
LOCK_FILE="$PARALLM_HOME/$NAME.lock"
LOCK_WAIT_SECS="${PARALLM_INSTALL_LOCK_WAIT:-900}"
BASE_PY="${PARALLM_PYTHON:-python3}"

log() { printf 'python-env: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

venv_ok() {
    [ -x "$VPY" ] && "$VPY" -c 'import sys, pip' >/dev/null 2>&1
}

packages_ok() {
    # shellcheck disable=SC2086
    "$VPY" - $PACKAGES >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
for spec in sys.argv[1:]:
    name, want = spec.split("==")
    if version(name.split("[")[0]) != want:
        sys.exit(1)
PY
}

# Fast path, no lock needed.
if venv_ok && packages_ok; then
    printf '%s\n' "$VPY"
    exit 0
fi

mkdir -p "$PARALLM_HOME"
exec 9>>"$LOCK_FILE" || die "cannot open lock file $LOCK_FILE"
if ! flock -w "$LOCK_WAIT_SECS" 9; then
    die "timed out after ${LOCK_WAIT_SECS}s waiting for $LOCK_FILE"
fi

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo -n "$@"
    else
        return 1
    fi
}

install_debian_venv() {
    command -v apt-get >/dev/null 2>&1 || return 1
    log "installing Debian package python3-venv"
    local opts=(-y --no-install-recommends -o DPkg::Lock::Timeout=600)
    if ! as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" python3-venv </dev/null >&2; then
        as_root env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update </dev/null >&2 || true
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install "${opts[@]}" python3-venv </dev/null >&2 || return 1
    fi
}

create_venv() {
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV" >&2 && venv_ok
}

if ! venv_ok; then
    command -v "$BASE_PY" >/dev/null 2>&1 || die "'$BASE_PY' not found (set PARALLM_PYTHON to a Python 3 interpreter)"
    [ -e "$VENV" ] && log "venv at $VENV is broken; recreating it"
    log "creating venv at $VENV with $("$BASE_PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    if ! create_venv; then
        log "'$BASE_PY -m venv' failed (missing ensurepip/venv support?)"
        install_debian_venv || die "cannot create a venv with '$BASE_PY' and could not install python3-venv"
        create_venv || die "'$BASE_PY -m venv $VENV' still fails after installing python3-venv"
    fi
fi

if ! packages_ok; then
    log "installing $PACKAGES into $VENV"
    # shellcheck disable=SC2086
    "$VPY" -m pip install --disable-pip-version-check --no-input --quiet \
        $PACKAGES </dev/null >&2 \
        || die "pip install $PACKAGES failed"
    packages_ok || die "$PACKAGES not importable after install"
fi

printf '%s\n' "$VPY"
