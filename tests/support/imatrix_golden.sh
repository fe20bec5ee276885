#!/usr/bin/env bash
# Makes tests/golden/imatrix.json: llama.cpp's importance matrix of the
# reference model on the GPL-3 text that Debian ships
# (/usr/share/common-licenses/GPL-3, package base-files), with -c 512 (14
# windows). The whole matrix is 150k values; the golden keeps, per weight
# tensor, the rows counted, the sum of Σx² over the columns, and the eight
# columns of largest Σx² with their values (the outlier features an
# importance matrix exists for). Run once, by hand, when the model or the
# text changes; CI only reads the JSON (tests/calibration.rs compares
# `parallm imatrix` with it).
#
#   tests/support/imatrix_golden.sh [MODEL.gguf] > tests/golden/imatrix.json
#
# llama-imatrix comes from ../shared/bench/llamacpp-anchor.sh (built once).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MODEL=${1:-${PARALLM_HOME:-$HOME/.cache/parallm}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=/usr/share/common-licenses/GPL-3
BIN=$("$here/../../../shared/bench/llamacpp-anchor.sh")
[ -f "$MODEL" ] || { echo "no model at $MODEL (run parallm generate once to fetch it)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$BIN/llama-imatrix" -m "$MODEL" -f "$TEXT" -c 512 -t 2 -o "$tmp/imatrix.gguf" >"$tmp/log" 2>&1 \
  || { cat "$tmp/log" >&2; exit 1; }
TOOL="llama-imatrix (llama.cpp $(basename "$(dirname "$(dirname "$BIN")")"), -c 512 -t 2)" \
MODEL_NAME=$(basename "$MODEL") MODEL_SHA=$(sha256sum "$MODEL" | cut -c1-64) \
TEXT="$TEXT" TEXT_SHA=$(sha256sum "$TEXT" | cut -c1-64) \
PYTHONPATH="$here" python3 - "$tmp/imatrix.gguf" <<'PY'
import json, os, sys
import gguf_f32
meta, tensors = gguf_f32.read(sys.argv[1])
entries = {}
for name in sorted(tensors):
    if not name.endswith('.in_sum2'):
        continue
    weight = name[:-len('.in_sum2')]
    v = tensors[name]
    top = sorted(range(len(v)), key=lambda j: -v[j])[:8]
    entries[weight] = {
        'columns': len(v),
        'count': tensors[weight + '.counts'][0],
        'sum': sum(v),
        'top': [[j, v[j]] for j in top],
    }
print(json.dumps({
    'tool': os.environ['TOOL'],
    'model': os.environ['MODEL_NAME'],
    'model_sha256': os.environ['MODEL_SHA'],
    'text': os.environ['TEXT'],
    'text_sha256': os.environ['TEXT_SHA'],
    'chunk_count': meta['imatrix.chunk_count'],
    'chunk_size': meta['imatrix.chunk_size'],
    'entries': entries,
}, indent=1))
PY
