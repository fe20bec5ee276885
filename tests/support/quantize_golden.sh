#!/usr/bin/env bash
# Makes tests/golden/quantize.json: llama.cpp's perplexity (GPL-3 text,
# -c 512, 2 threads) on the files `parallm quantize` writes from the
# reference model's f32 weights, and on the files llama-quantize writes
# from the same f32 file; with the SHA-256 of parallm's files, so that
# tests/quantize.rs can check that the bytes llama.cpp ran are the bytes
# quantize writes now. Run once, by hand, when quantize changes:
#
#   tests/support/quantize_golden.sh > tests/golden/quantize.json
#
# llama-quantize and llama-perplexity come from
# ../shared/bench/llamacpp-anchor.sh; parallm from `cargo build --release`.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
MODEL=${1:-${PARALLM_HOME:-$HOME/.cache/parallm}/models/SmolLM2-135M-Instruct.Q4_1.gguf}
TEXT=/usr/share/common-licenses/GPL-3
BIN=$("$root/../shared/bench/llamacpp-anchor.sh")
P="$root/target/release/parallm"
[ -x "$P" ] || (cd "$root" && cargo build --release >&2)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$P" quantize "$MODEL" "$work/f32.gguf" --type f32 >&2
ppl() { "$BIN/llama-perplexity" -m "$1" -f "$TEXT" -c 512 -t 2 2>&1 | grep -o 'PPL = [0-9.]*' | awk '{print $3}'; }
entries=()
for t in q8_0 q4_k_m q4_0; do
  T=$(echo "$t" | tr a-z A-Z)
  "$P" quantize "$work/f32.gguf" "$work/p-$t.gguf" --type "$t" >&2
  "$BIN/llama-quantize" "$work/f32.gguf" "$work/l-$t.gguf" "$T" 2 >&2 2>/dev/null
  entries+=("$(printf '    {"type": "%s", "parallm_sha256": "%s", "parallm_bytes": %s, "llama_quantize_bytes": %s, "llama_ppl_parallm_file": %s, "llama_ppl_llama_quantize_file": %s}' \
    "$t" "$(sha256sum "$work/p-$t.gguf" | cut -c1-64)" "$(stat -c %s "$work/p-$t.gguf")" "$(stat -c %s "$work/l-$t.gguf")" \
    "$(ppl "$work/p-$t.gguf")" "$(ppl "$work/l-$t.gguf")")")
done
printf '{\n  "tool": "llama-quantize and llama-perplexity (%s), -c 512 -t 2 on %s",\n  "model": "%s",\n  "base_sha256": "%s",\n  "files": [\n' \
  "$(basename "$(dirname "$(dirname "$BIN")")")" "$TEXT" "$(basename "$MODEL")" "$(sha256sum "$work/f32.gguf" | cut -c1-64)"
( IFS=$'\n'; echo "${entries[*]}" ) | sed '$!s/$/,/'
printf '  ]\n}\n'
