#!/usr/bin/env bash
# lm-eval-env.sh — a Python virtualenv with lm-evaluation-harness (its API
# models: `lm_eval[api]`, no torch), for tests/serve.rs, which runs its
# `local-completions` model against `parallm serve` on the task in
# tests/support/lm_eval/. The venv is "$PARALLM_HOME/lmeval-env", made and
# kept by python-env.sh (same locking, idempotent); the last line of stdout
# is its python.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
PARALLM_PYENV_NAME=lmeval-env \
PARALLM_PYENV_PACKAGES="lm_eval[api]==0.4.13" \
    exec "$here/python-env.sh"
