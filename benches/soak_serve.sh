#!/usr/bin/env bash
# A long run against one `parallm serve`: ROUNDS rounds of
# `benches/chaos_serve.py --draft --mixed` (240 requests at 32 concurrent,
# round R with seed R) against a server with a 32 MiB KV pool, two replicas
# and a draft model, so that eviction, preemption, speculation and dropped
# clients happen all the time. After each round it prints the server's
# resident memory, open files, threads and /metrics lines, read from /proc
# (Linux), and at the end the growth over the first round and over the
# second half. It fails naming the first round whose checks failed, and if
# the server does not exit 0 on SIGTERM at the end. Whether memory grows is
# for the reader: the allocator's first rounds always add some.
#
#   RAYON_NUM_THREADS=2 bash benches/soak_serve.sh target/release/parallm [rounds] [draft.gguf]
#
# The draft defaults to the served (reference) model itself, from parallm's
# cache (see `reference_model` in serve_common.sh).
set -euo pipefail

BIN=${1:?usage: soak_serve.sh PARALLM_BINARY [rounds] [draft.gguf]}
ROUNDS=${2:-20}
DRAFT=${3:-}
PORT=8443
URL="http://127.0.0.1:$PORT"
OUT=$(mktemp -d)
HERE=$(dirname "$0")
trap 'rm -rf "$OUT"' EXIT

# shellcheck source=benches/serve_common.sh
source "$HERE/serve_common.sh"

if [ -z "$DRAFT" ]; then
    DRAFT=$(reference_model)
fi
[ -f "$DRAFT" ] || { echo "no draft model at '$DRAFT'" >&2; exit 1; }

PARALLM__SCHEDULER__KV_MEMORY_MIB=32 "$BIN" serve --port "$PORT" --dp 2 \
    --draft-model "$DRAFT" >"$OUT/serve.log" 2>&1 &
pid=$!
wait_ready "$URL" "$pid" || { kill "$pid" 2>/dev/null || true; tail -n 20 "$OUT/serve.log" >&2; exit 1; }

# One line of figures: resident KiB, open files, threads, /metrics lines.
snapshot() {
    local rss fds threads lines
    rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
    fds=$(find "/proc/$pid/fd" -mindepth 1 -maxdepth 1 | wc -l)
    threads=$(find "/proc/$pid/task" -mindepth 1 -maxdepth 1 | wc -l)
    lines=$(curl -sf -m 10 "$URL/metrics" | wc -l)
    echo "$rss $fds $threads $lines"
}

read -r rss0 fds0 threads0 lines0 < <(snapshot)
echo "start: resident ${rss0} KiB, ${fds0} open files, ${threads0} threads, ${lines0} metric lines"
declare -a rss=()
failed=""
for round in $(seq 1 "$ROUNDS"); do
    if ! python3 "$HERE/chaos_serve.py" --port "$PORT" --draft --mixed \
        --requests 240 --concurrency 32 --seed "$round" >"$OUT/round.txt" 2>&1; then
        failed=$round
        echo "round $round failed:" >&2
        tail -n 20 "$OUT/round.txt" >&2
        break
    fi
    read -r r f t l < <(snapshot)
    rss[round]=$r
    idle=$(grep -m1 -o 'idle [0-9.]* s' "$OUT/round.txt" || echo "idle ?")
    echo "round $round: ok ($idle after the last client); resident $r KiB, $f open files, $t threads, $l metric lines"
done

kill -TERM "$pid"
code=0
wait "$pid" || code=$?
if [ -n "$failed" ]; then
    exit 1
fi
if [ "$code" != 0 ]; then
    echo "the server exited $code on SIGTERM" >&2
    tail -n 20 "$OUT/serve.log" >&2
    exit 1
fi
half=$(((ROUNDS + 1) / 2))
echo "resident growth: $(((rss[ROUNDS] - rss[1]) / 1024)) MiB from round 1 to $ROUNDS," \
    "$(((rss[ROUNDS] - rss[half]) / 1024)) MiB from round $half"
echo "the server exited 0 on SIGTERM"
