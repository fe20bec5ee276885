#!/usr/bin/env bash
# Issue 13's points side by side with llama.cpp, on the reference model, in
# alternating rounds (the host is shared and noisy: compare per-round
# ratios, and quote medians):
#
#   - batch-1 decode of the bare shard at depth 16 and 512, 2 and 1 threads,
#     against llama-bench tg128 at depth 0 and 512;
#   - prefill 512 with AMX, and with PARALLM_CPU_FEATURES=-amx (the VNNI
#     kernels), against llama-bench pp512;
#   - the engine at 1, 16 and 64 requests against llama-batched-bench;
#   - HTTP, one client, against llama-server -np 1.
#
#   bash benches/single_stream.sh PARALLM_BINARY [BASELINE_BINARY] [ROUNDS]
#
# With a baseline binary, its engine figures (and prefill) run in the same
# rounds, for a before / after. Needs llama.cpp's tools from
# shared/bench/llamacpp-anchor.sh (under ANCHOR_DIR, default
# ~/.cache/parallm-anchors) and the reference model in PARALLM_HOME (default
# ~/.cache/parallm; `parallm generate` fetches it).
set -uo pipefail

P=${1:?usage: single_stream.sh PARALLM_BINARY [BASELINE_BINARY] [ROUNDS]}
BASE=${2:-}
ROUNDS=${3:-3}
ANCHOR="${ANCHOR_DIR:-$HOME/.cache/parallm-anchors}"
L=$(ls -d "$ANCHOR"/llama.cpp-*/build-*/bin 2>/dev/null | head -1)
[ -n "$L" ] || { echo "no llama.cpp build under $ANCHOR: run shared/bench/llamacpp-anchor.sh" >&2; exit 1; }
export LD_LIBRARY_PATH="$L"

# shellcheck source=benches/serve_common.sh
source "$(dirname "$0")/serve_common.sh"
M=$(reference_model) || exit 1

latency() { # binary threads features args...
    local bin=$1 t=$2 f=$3
    shift 3
    PARALLM_CPU_FEATURES=$f RAYON_NUM_THREADS=$t "$bin" bench latency --model "$M" "$@" 2>&1
}

# http NAME PORT SERVER_COMMAND...: starts the server, drives it with one
# client (8 prompts, 128 tokens in and out, seed of the round), stops it.
http() {
    local name=$1 port=$2
    shift 2
    echo "-- HTTP, $name"
    "$@" >/dev/null 2>&1 &
    local pid=$!
    if wait_ready "http://127.0.0.1:$port" "$pid"; then
        "$P" bench serve --url "http://127.0.0.1:$port" --num-prompts 8 --max-concurrency 1 \
            --prompt-tokens 128 --output-tokens 128 --seed "$r" --no-progress 2>&1 |
            grep -E "Output token throughput"
    fi
    kill "$pid"
    wait "$pid" 2>/dev/null
}

for r in $(seq 1 "$ROUNDS"); do
    echo "=== round $r"
    for t in 2 1; do
        echo "-- llama-bench tg128, $t threads (depth 0, then 512)"
        "$L/llama-bench" -m "$M" -t "$t" -p 0 -n 128 -d 0,512 -r 3 2>/dev/null | grep -E "tg128"
        for d in 16 512; do
            echo -n "-- parallm decode, $t threads, depth $d: "
            latency "$P" "$t" "" --prompt-tokens "$d" --decode-tokens 128 --batches 1 \
                --batch-steps 1 --runs 3 | grep "decode 128"
        done
    done
    echo "-- llama-bench pp512"
    "$L/llama-bench" -m "$M" -t 2 -p 512 -n 0 -r 3 2>/dev/null | grep pp512
    for b in "$P" $BASE; do
        for f in "" -amx; do
            echo -n "-- prefill 512, $b${f:+ ($f)}: "
            latency "$b" 2 "$f" --prompt-tokens 512 --decode-tokens 8 --batches 1 \
                --batch-steps 1 --runs 3 | grep "prefill 512"
        done
    done
    echo "-- llama-batched-bench"
    "$L/llama-batched-bench" -m "$M" -t 2 -npp 128 -ntg 128 -npl 1,16,64 -c 16384 2>/dev/null |
        grep -E "^\|  +128"
    for b in "$P" $BASE; do
        echo "-- engine, $b"
        RAYON_NUM_THREADS=2 "$b" bench throughput --model "$M" --prompt-tokens 128 \
            --output-tokens 128 --concurrency 1,16,64 2>&1 | grep -E "^\| [0-9]"
    done
    http "llama-server -np 1" 8401 "$L/llama-server" -m "$M" -t 2 -np 1 -c 1024 --port 8401
    RAYON_NUM_THREADS=2 http "parallm serve" 8402 "$P" serve --model "$M" --port 8402
done
