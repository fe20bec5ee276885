# Sourced by the serving benchmarks: wait_ready URL waits until the
# OpenAI-compatible server at URL answers a one-token completion (up to
# two minutes), or fails naming it.
wait_ready() {
    local url=$1
    for _ in $(seq 1 600); do
        if curl -sf -m 5 "$url/v1/completions" -H 'Content-Type: application/json' \
            -d '{"prompt": "Hi", "max_tokens": 1}' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    echo "the server at $url never answered" >&2
    return 1
}
