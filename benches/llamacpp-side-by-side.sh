#!/usr/bin/env bash
# llamacpp-side-by-side.sh — llama-bench against `parallm bench latency` on the
# same GGUF files, alternating, three rounds (the host is shared and noisy:
# compare the per-round ratios).
#
#   benches/llamacpp-side-by-side.sh smollm-Q5_K_M.gguf smollm-Q4_K_M.gguf ...
#
# Needs llama.cpp's tools from shared/bench/llamacpp-anchor.sh (found under
# ANCHOR_DIR, default ~/.cache/parallm-anchors) and a release build of
# parallm (PARALLM, default target/release/parallm). Prints one line per
# measurement: engine, file, round, test, tok/s.
#
# PARALLM_ALSO="-amx -avx512" also runs parallm with each of those
# PARALLM_CPU_FEATURES values (engine "parallm[-amx]", ...), in the same rounds.
set -euo pipefail
ANCHOR="${ANCHOR_DIR:-$HOME/.cache/parallm-anchors}"
BIN=$(ls -d "$ANCHOR"/llama.cpp-*/build-*/bin 2>/dev/null | head -1)
[ -n "$BIN" ] || { echo "no llama.cpp build under $ANCHOR: run shared/bench/llamacpp-anchor.sh" >&2; exit 1; }
PARALLM="${PARALLM:-target/release/parallm}"
export LD_LIBRARY_PATH="$BIN"
for round in 1 2 3; do
  for f in "$@"; do
    name=$(basename "$f" .gguf)
    "$BIN/llama-bench" -m "$f" -t 2 -p 512 -n 128 -r 3 -o csv 2>/dev/null \
      | awk -F, -v n="$name" -v r="$round" 'NR > 1 { gsub(/"/, ""); print "llama.cpp", n, r, ($(NF-7) > 0 ? "prefill" : "decode"), $(NF-1) }'
    for v in "" ${PARALLM_ALSO:-}; do
      engine="parallm${v:+[$v]}"
      PARALLM_CPU_FEATURES="$v" RAYON_NUM_THREADS=2 "$PARALLM" bench latency --model "$f" --runs 3 --batches 1 2>&1 \
        | awk -v e="$engine" -v n="$name" -v r="$round" -F'|' '/^\| (prefill|decode [0-9]+ \(batch 1\))/ { t = ($2 ~ /prefill/) ? "prefill" : "decode"; gsub(/ /, "", $3); print e, n, r, t, $3 }'
    done
  done
done
