#!/usr/bin/env bash
# Issue 19's prefix-caching workload: 32 requests sharing a 384-token prefix,
# each with its own 32-token suffix, 64 tokens out, 16 at a time, through
# `parallm serve` with prefix caching on and off, alternating, a fresh server
# per run; the order alternates between rounds (on then off, off then on),
# since on a shared host the first of two runs can be the slower one. Prints
# each run's output tok/s and median TTFT, then the off / on ratio of the
# median TTFTs per round and the median of those ratios.
#
#   RAYON_NUM_THREADS=2 bash benches/shared_prefix.sh target/release/parallm [rounds]
set -euo pipefail

BIN=${1:?usage: shared_prefix.sh PARALLM_BINARY [rounds]}
ROUNDS=${2:-5}
PORT=8441
URL="http://127.0.0.1:$PORT"
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT

# shellcheck source=benches/serve_common.sh
source "$(dirname "$0")/serve_common.sh"

ratios=()
for round in $(seq 1 "$ROUNDS"); do
    declare -A ttft=()
    order="true false"
    if [ $((round % 2)) = 0 ]; then order="false true"; fi
    for caching in $order; do
        PARALLM__SCHEDULER__PREFIX_CACHING=$caching "$BIN" serve --port "$PORT" >"$OUT/serve.log" 2>&1 &
        pid=$!
        wait_ready "$URL" "$pid" || { kill "$pid" 2>/dev/null || true; exit 1; }
        "$BIN" bench serve --url "$URL" --num-prompts 32 --max-concurrency 16 \
            --shared-prefix-tokens 384 --prompt-tokens 32 --output-tokens 64 --seed "$round" \
            --no-progress >"$OUT/bench.txt" 2>&1
        kill "$pid"
        wait "$pid" 2>/dev/null || true
        tok=$(awk -F: '/Output token throughput/ {gsub(/ /, "", $2); print $2}' "$OUT/bench.txt")
        ttft[$caching]=$(awk -F: '/Median TTFT/ {gsub(/ /, "", $2); print $2}' "$OUT/bench.txt")
        echo "round $round, prefix caching $caching: output $tok tok/s, median TTFT ${ttft[$caching]} ms"
    done
    ratio=$(awk -v off="${ttft[false]}" -v on="${ttft[true]}" 'BEGIN {printf "%.2f", off / on}')
    echo "round $round: median TTFT off / on = ${ratio}x"
    ratios+=("$ratio")
    unset ttft
done
printf '%s\n' "${ratios[@]}" | sort -n |
    awk '{r[NR] = $1} END {m = (NR % 2) ? r[(NR + 1) / 2] : (r[NR / 2] + r[NR / 2 + 1]) / 2; printf "median of the ratios over %d rounds: %.2fx\n", NR, m}'
