# Sourced by the serving benchmarks: wait_ready URL [PID] waits until the
# OpenAI-compatible server at URL answers a one-token completion (up to
# two minutes), or fails naming it; with PID, it also fails as soon as
# that process (the server started for the run) is gone, so that another
# server on the same port is never measured instead.
wait_ready() {
    local url=$1 pid=${2:-}
    for _ in $(seq 1 600); do
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            echo "the server for $url (pid $pid) exited before it answered" >&2
            return 1
        fi
        if curl -sf -m 5 "$url/v1/completions" -H 'Content-Type: application/json' \
            -d '{"prompt": "Hi", "max_tokens": 1}' >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    echo "the server at $url never answered" >&2
    return 1
}

# The reference model in parallm's cache ($PARALLM_HOME, else
# ~/.cache/parallm), where `parallm generate` and `parallm serve` fetch it;
# fails naming the path when it is not there yet.
reference_model() {
    local m="${PARALLM_HOME:-$HOME/.cache/parallm}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    [ -f "$m" ] || { echo "no reference model at $m: run parallm generate once" >&2; return 1; }
    echo "$m"
}
