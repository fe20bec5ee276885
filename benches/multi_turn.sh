#!/usr/bin/env bash
# The multi-turn chat dataset of `parallm bench serve` (each turn resends the
# whole conversation) against parallm with prefix caching on and off and,
# when its binary is given, llama-server (prompt caching on, 16 slots).
#
#   RAYON_NUM_THREADS=2 bash benches/multi_turn.sh target/release/parallm [rounds] [llama-server]
#
# Prints bench serve's summary lines per server and round.
set -euo pipefail

BIN=${1:?usage: multi_turn.sh PARALLM_BINARY [rounds] [LLAMA_SERVER]}
ROUNDS=${2:-2}
LLAMA=${3:-}
MODEL=${MODEL:-$HOME/.cache/parallm/models/SmolLM2-135M-Instruct.Q4_1.gguf}
PORT=8439
URL="http://127.0.0.1:$PORT"

# shellcheck source=benches/serve_common.sh
source "$(dirname "$0")/serve_common.sh"

bench() {
    local name=$1 seed=$2
    echo "== $name, round $seed"
    "$BIN" bench serve --url "$URL" --multi-turn 4 --num-prompts 16 --max-concurrency 16 \
        --prompt-tokens 48 --output-tokens 64 --ignore-eos --seed "$seed" --no-progress 2>/dev/null |
        grep -E "Output token throughput|Median TTFT|Median TPOT|Total input tokens|cached" || true
}

for round in $(seq 1 "$ROUNDS"); do
    for caching in true false; do
        PARALLM__SCHEDULER__PREFIX_CACHING=$caching "$BIN" serve --port "$PORT" --model "$MODEL" \
            >/tmp/multi_turn_server.log 2>&1 &
        pid=$!
        wait_ready "$URL" "$pid"
        bench "parallm, prefix_caching=$caching" "$round"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    done
    if [ -n "$LLAMA" ]; then
        LD_LIBRARY_PATH=$(dirname "$LLAMA") "$LLAMA" -m "$MODEL" -t 2 -np 16 -c 32768 \
            --port "$PORT" >/tmp/multi_turn_llama.log 2>&1 &
        pid=$!
        wait_ready "$URL" "$pid"
        bench "llama-server" "$round"
        kill "$pid"
        wait "$pid" 2>/dev/null || true
    fi
done
