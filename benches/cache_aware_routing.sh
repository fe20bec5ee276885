#!/usr/bin/env bash
# Cache-aware against least-loaded routing with two data-parallel replicas,
# through `parallm serve --dp 2` and `parallm bench serve`'s shared-prefix
# dataset (two prefix families, one drawn at random per request).
#
#   RAYON_NUM_THREADS=2 bash benches/cache_aware_routing.sh target/release/parallm [rounds] [kv_blocks]
#
# kv_blocks (per replica; default: from the default KV memory) small enough
# that a replica cannot keep both families' prefixes shows the difference
# best. Prints, per run: the prefix-cache hit ratio and the requests each
# replica got (from /metrics), then bench serve's summary lines.
set -euo pipefail

BIN=${1:?usage: cache_aware_routing.sh PARALLM_BINARY [rounds] [kv_blocks]}
ROUNDS=${2:-2}
KV_BLOCKS=${3:-0}
PORT=8437
URL="http://127.0.0.1:$PORT"
# shellcheck source=benches/serve_common.sh
source "$(dirname "$0")/serve_common.sh"

run() {
    local aware=$1 seed=$2
    "$BIN" serve --port "$PORT" --dp 2 --set "scheduler.cache_aware_routing=$aware" \
        --set "scheduler.kv_blocks=$KV_BLOCKS" >/tmp/cache_aware_routing.log 2>&1 &
    local pid=$!
    trap 'kill $pid 2>/dev/null || true' RETURN
    wait_ready "$URL" "$pid"
    local before
    before=$(curl -sf "$URL/metrics")
    "$BIN" bench serve --url "$URL" --num-prompts 64 --max-concurrency 16 \
        --shared-prefix-tokens 384 --prefix-groups 2 --prompt-tokens 32 \
        --output-tokens 64 --seed "$seed" --no-progress 2>/dev/null |
        grep -E "Output token throughput|Median TTFT|Request throughput" || true
    local after
    after=$(curl -sf "$URL/metrics")
    python3 - "$aware" "$before" "$after" <<'EOF'
import sys
aware, before, after = sys.argv[1], sys.argv[2], sys.argv[3]
def read(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        out[name] = float(value)
    return out
b, a = read(before), read(after)
d = lambda k: a.get(k, 0.0) - b.get(k, 0.0)
q, h = d("parallm_prefix_cache_queries_total"), d("parallm_prefix_cache_hits_total")
routed = [d(f'parallm_requests_routed_total{{replica="{r}"}}') for r in (0, 1)]
print(f"cache_aware_routing={aware}: hit ratio {h / q if q else 0:.3f}, requests per replica {routed[0]:.0f} / {routed[1]:.0f}")
EOF
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

for round in $(seq 1 "$ROUNDS"); do
    run true "$round"
    run false "$round"
done
