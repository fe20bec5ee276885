#!/usr/bin/env bash
# Makes tests/golden/perplexity.json: llama.cpp's perplexity of the
# reference model on the GPL-3 text that Debian ships
# (/usr/share/common-licenses/GPL-3, package base-files), with -c 512: 14
# windows, 3570 tokens scored. (Shorter runs are too noisy for a 0.5%
# comparison: with -c 128 over 8 windows, 504 tokens, parallm's own result
# moves by 1% between an f32, f16 or bf16 KV cache.) Run once, by hand, when the model or the text
# changes; CI only reads the JSON (tests/perplexity.rs compares
# `parallm perplexity` with it, within 0.5%).
#
#   tests/support/perplexity_golden.sh [MODEL.gguf] > tests/golden/perplexity.json
#
# llama-perplexity comes from ../shared/bench/llamacpp-anchor.sh (built once).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
MODEL=${1:-${PARALLM_HOME:-$HOME/.cache/parallm}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=/usr/share/common-licenses/GPL-3
BIN=$("$here/../../../shared/bench/llamacpp-anchor.sh")
[ -f "$MODEL" ] || { echo "no model at $MODEL (run parallm generate once to fetch it)" >&2; exit 1; }
run() { # ctx chunks-or-empty
  local extra=()
  [ -n "$2" ] && extra=(--chunks "$2")
  "$BIN/llama-perplexity" -m "$MODEL" -f "$TEXT" -c "$1" -t 2 "${extra[@]}" 2>&1
}
emit() { # ctx chunks-or-empty
  local out final running
  out=$(run "$1" "$2")
  final=$(grep -o 'PPL = [0-9.]* +/- [0-9.]*' <<<"$out" | head -1)
  running=$(grep -o '\[[0-9]*\][0-9.]*' <<<"$out" | sed 's/.*\]//' | paste -sd, -)
  printf '    {"ctx": %s, "chunks": %s, "ppl": %s, "ppl_error": %s, "running": [%s]}' \
    "$1" "$(grep -o '\[[0-9]*\]' <<<"$out" | wc -l)" \
    "$(awk '{print $3}' <<<"$final")" "$(awk '{print $5}' <<<"$final")" "$running"
}
cat <<JSON
{
  "tool": "llama-perplexity (llama.cpp $(basename "$(dirname "$(dirname "$BIN")")"), -t 2)",
  "model": "$(basename "$MODEL")",
  "model_sha256": "$(sha256sum "$MODEL" | cut -c1-64)",
  "text": "$TEXT",
  "text_sha256": "$(sha256sum "$TEXT" | cut -c1-64)",
  "runs": [
$(emit 512 "")
  ]
}
JSON
