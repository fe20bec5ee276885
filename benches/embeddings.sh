#!/usr/bin/env bash
# embeddings.sh — embedding throughput side by side: `parallm bench embeddings`
# against llama.cpp's llama-embedding on the same GGUF, both at 2 threads,
# alternating, in rounds (the host is shared and noisy: compare per round).
#
#   benches/embeddings.sh [ROUNDS]
#
# The model is a random-weight BERT of all-MiniLM-L6-v2's shape (6 layers,
# hidden 384, 12 heads, FFN 1536, 30522 tokens, f16), written by
# tests/support/bert_models.py --bench in llama.cpp's converter's layout; the
# inputs are 256 lines of 64 to 128 words of its vocabulary (about 97 tokens
# each, [CLS] and [SEP] included), seeded. Weights do not change the work,
# so a random model measures what a trained one of that shape would.
#
# parallm: the inputs tokenized first, then all 256 submitted at once as
# separate requests; the time until the last answer (median of 3 after a
# warm-up). llama-embedding: every batch size of 512, 1024 and 2048 tokens
# (its best is quoted; it packs whole sequences into one batch and masks
# attention between them); the time from its first batch to its exit (the
# model load and tokenizing before it left out).
#
# Needs llama.cpp's tools from shared/bench/llamacpp-anchor.sh (under
# ANCHOR_DIR, default ~/.cache/parallm-anchors), a release build of parallm
# (PARALLM, default target/release/parallm) and the Python environment of
# tests/support/python-env.sh. Prints one line per measurement: engine,
# round, setting, sequences/s.
set -euo pipefail
ROUNDS=${1:-3}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
ANCHOR="${ANCHOR_DIR:-$HOME/.cache/parallm-anchors}"
BIN=$(ls -d "$ANCHOR"/llama.cpp-*/build-*/bin 2>/dev/null | head -1)
[ -n "$BIN" ] || { echo "no llama.cpp build under $ANCHOR: run shared/bench/llamacpp-anchor.sh" >&2; exit 1; }
PARALLM="${PARALLM:-$ROOT/target/release/parallm}"
OUT="${OUT:-$ROOT/target/embeddings-bench}"
mkdir -p "$OUT"
PY=$(bash "$ROOT/tests/support/python-env.sh" | tail -1)
MODEL="$OUT/minilm-shape-f16.gguf"
[ -f "$MODEL" ] || (cd "$ROOT/tests/support" && "$PY" bert_models.py --bench "$MODEL" >/dev/null)
TEXTS="$OUT/texts.txt"
"$PY" - "$TEXTS" <<'EOF'
import random, sys
sys.path.insert(0, "tests/support")
from bert_models import WORDS
r = random.Random(7)
with open(sys.argv[1], "w") as f:
    for _ in range(256):
        f.write(" ".join(r.choice(WORDS) for _ in range(r.randint(64, 128))) + "\n")
EOF
N=$(wc -l < "$TEXTS")
export LD_LIBRARY_PATH="$BIN"
for round in $(seq 1 "$ROUNDS"); do
  for b in 512 1024 2048; do
    log="$OUT/llama-$b.log"
    start=$(date +%s.%N)
    "$BIN/llama-embedding" -m "$MODEL" -f "$TEXTS" -t 2 -c "$b" -b "$b" -ub "$b" \
      --embd-output-format array > "$OUT/llama-$b.json" 2> "$log"
    end=$(date +%s.%N)
    # Its log lines start with the time since its start (min.s.ms.us): the
    # first batch's.
    first=$(awk '/batch_decode: n_tokens/ { split($1, t, "."); print t[1] * 60 + t[2] + t[3] / 1000; exit }' "$log")
    awk -v n="$N" -v s="$start" -v e="$end" -v f="$first" -v r="$round" -v b="$b" \
      'BEGIN { printf "llama-embedding %s batch=%s %.1f\n", r, b, n / (e - s - f) }'
  done
  for b in 512 1024 2048; do
    "$PARALLM" bench embeddings --model "$MODEL" --file "$TEXTS" --threads 2 --rounds 3 \
      --max-batch-tokens "$b" --json \
      | awk -v r="$round" -v b="$b" -F'"seq_per_s":' '{ split($2, v, ","); printf "parallm %s max_batch_tokens=%s %.1f\n", r, b, v[1] }'
  done
done
