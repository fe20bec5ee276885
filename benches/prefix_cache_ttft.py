#!/usr/bin/env python3
"""Time to the first token of requests that share a long prefix, with
`scheduler.prefix_caching` on and off, through `parallm serve`.

    RAYON_NUM_THREADS=2 python3 benches/prefix_cache_ttft.py target/release/parallm [rounds]

A ~680-token system prompt is followed by a short question that differs per
request. The first request fills the cache; the next 8 are timed one at a time
(max_tokens 1, so the time is the prefill of what is not cached plus one
step). Standard library only.
"""
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request

PORT = 8431
SYSTEM = " ".join(
    f"Rule {i}: answer briefly, cite the section, and never invent numbers." for i in range(40)
)


def post(body):
    req = urllib.request.Request(
        f"http://127.0.0.1:{PORT}/v1/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    t = time.time()
    with urllib.request.urlopen(req) as r:
        out = json.load(r)
    return time.time() - t, out


def run(binary, caching):
    env = dict(os.environ, PARALLM__SCHEDULER__PREFIX_CACHING=caching)
    server = subprocess.Popen(
        [binary, "serve", "--port", str(PORT)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(600):
            try:
                post({"prompt": "Hi", "max_tokens": 1})
                break
            except OSError:
                time.sleep(0.5)
        else:
            sys.exit("the server never answered")
        times, cached, prompt = [], [], 0
        for i in range(9):
            body = {
                "prompt": SYSTEM + f"\nQuestion {i}: what is rule {i}?",
                "max_tokens": 1,
                "temperature": 0,
            }
            dt, out = post(body)
            prompt = out["usage"]["prompt_tokens"]
            if i > 0:
                times.append(dt * 1000)
                cached.append(out["usage"]["prompt_tokens_details"]["cached_tokens"])
        return statistics.median(times), prompt, cached
    finally:
        server.terminate()
        server.wait()


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/release/parallm"
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for r in range(rounds):
        for caching in ["true", "false"]:
            med, prompt, cached = run(binary, caching)
            print(
                f"round {r} prefix_caching={caching}: prompt {prompt} tokens, "
                f"median {med:.1f} ms to the one token, cached_tokens {sorted(set(cached))}"
            )


if __name__ == "__main__":
    main()
