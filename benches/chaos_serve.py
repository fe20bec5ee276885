#!/usr/bin/env python3
"""A seeded chaos run against a running `parallm serve`: many concurrent
completions over a few shared prefixes (streaming or not, greedy or seeded
sampling, `n` of 2-3, n-gram speculation, and with `--draft` draft-model
speculation; `--mixed` adds chat turns, stop strings, logprobs, JSON-guided
output and beam search), some far too long for the KV pool, a quarter
dropped by the client mid-flight. Then it checks what must hold whatever
happened: every answer has its `n` choices, no stop string in their text,
logprobs that spell it and (where guided and finished) JSON, and every
stream ends with [DONE]; at idle no KV block is in use and nothing runs or
waits; every refusal is a 400 naming a field; and a fixed greedy prompt
gives the same text before and after (four at once after, so that every
replica answers one). Exits 1 naming what did not hold.

Best with a small KV pool, so that eviction and preemption happen all the
time, for example:

    PARALLM__SCHEDULER__KV_MEMORY_MIB=32 RAYON_NUM_THREADS=2 parallm serve --port 8441 &
    python3 benches/chaos_serve.py --port 8441 [--requests 240] [--concurrency 32]

With a draft model (`--draft-model PATH` on the server), `--draft` has some
requests speculate with it.

Standard library only.
"""
import argparse
import http.client
import json
import random
import sys
import threading
import time
import urllib.request

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi "
         "omicron pi rho sigma tau upsilon phi chi psi omega").split()


def post(addr, body, abort_after=None, timeout=300, path="/v1/completions"):
    """(status, body bytes), or ("aborted", b"") when the client hung up."""
    c = http.client.HTTPConnection(*addr, timeout=timeout)
    c.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    if abort_after is not None:
        time.sleep(abort_after)
        c.close()
        return "aborted", b""
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def request_body(i, prefixes, draft=False, mixed=False):
    """(path, body, seconds before the client hangs up or None)."""
    rnd = random.Random(i)
    body = {
        "prompt": rnd.choice(prefixes) + " " + " ".join(rnd.choice(WORDS) for _ in range(rnd.randint(1, 30))),
        "max_tokens": rnd.randint(1, 64),
        "stream": rnd.random() < 0.5,
    }
    if rnd.random() < 0.5:
        body["temperature"] = 0
    else:
        body["temperature"] = 0.8
        body["seed"] = i
    if rnd.random() < 0.3:
        body["n"] = rnd.randint(2, 3)
    if rnd.random() < 0.4:
        method = "draft" if draft and rnd.random() < 0.5 else "ngram"
        body["speculative"] = {"method": method, "num_speculative_tokens": rnd.randint(1, 5)}
    if rnd.random() < 0.05:
        body["prompt"] = " ".join(["zeta"] * 4000)
    path = "/v1/completions"
    if mixed:
        kind = rnd.random()
        if kind < 0.15:
            body["stop"] = [rnd.choice(WORDS), "\n"]
        elif kind < 0.3:
            body["logprobs"] = rnd.randint(0, 3)
        elif kind < 0.4 and "speculative" not in body:
            body.pop("n", None)
            body.update(beam_width=rnd.randint(2, 3), temperature=0, stream=False)
        elif kind < 0.6:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
            if rnd.random() < 0.3 and "speculative" not in body:
                body["response_format"] = {"type": "json_object"}
    abort = rnd.uniform(0.01, 0.5) if rnd.random() < 0.25 else None
    return path, body, abort


def answer_problems(path, body, data):
    """What is wrong with a finished (200) answer to `body`: its choices,
    their logprobs, stop strings and JSON output, as far as a reply that
    may have been cut short by `max_tokens` can say. Streams are checked for
    their end marker only."""
    if body.get("stream"):
        return [] if data.rstrip().endswith(b"data: [DONE]") else ["a stream did not end with [DONE]"]
    r = json.loads(data)
    want = body.get("n", 1) if "beam_width" not in body else 1
    if len(r["choices"]) != want:
        return [f"{len(r['choices'])} choices for n={want}"]
    problems = []
    for c in r["choices"]:
        if c["finish_reason"] not in ("stop", "length"):
            problems.append(f"finish_reason {c['finish_reason']!r}")
        if path == "/v1/chat/completions":
            text = c["message"].get("content") or ""
            if "response_format" in body and c["finish_reason"] == "stop":
                try:
                    json.loads(text)
                except ValueError:
                    problems.append(f"JSON-guided output is not JSON: {text[:120]!r}")
        else:
            text = c["text"]
            if body.get("logprobs"):
                lp = c["logprobs"]
                tokens = lp["tokens"]
                if len(tokens) != len(lp["token_logprobs"]):
                    problems.append("logprobs' tokens and token_logprobs differ in length")
                # A token that ends inside a character shows as U+FFFD.
                elif not any("\ufffd" in t for t in tokens) and "".join(tokens) != text:
                    problems.append("logprobs' tokens do not spell the text")
        for stop in body.get("stop", []):
            if stop in text:
                problems.append(f"the text holds its stop string {stop!r}")
    return problems


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8441)
    ap.add_argument("--requests", type=int, default=240)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--draft", action="store_true", help="some requests speculate with the server's draft model")
    ap.add_argument("--idle-secs", type=float, default=30,
                    help="how long the server may take to be idle once every client is done")
    ap.add_argument("--mixed", action="store_true", help="chat, stop strings, logprobs, JSON output, beam search too")
    a = ap.parse_args()
    addr = (a.host, a.port)
    rnd = random.Random(a.seed)
    prefixes = [" ".join(rnd.choice(WORDS) for _ in range(n)) for n in (20, 45, 75, 100)]

    fixed_body = {"prompt": prefixes[2] + " the end", "max_tokens": 32, "temperature": 0}

    def fixed():
        status, data = post(addr, fixed_body)
        if status != 200:
            sys.exit(f"the fixed prompt was refused ({status}): {data[:300]!r}; give the server a larger KV pool")
        return json.loads(data)["choices"][0]["text"]

    before = fixed()
    outcomes, lock, slots = {}, threading.Lock(), threading.Semaphore(a.concurrency)

    def one(i):
        try:
            path, body, abort = request_body(i + a.seed * 100_000, prefixes, a.draft, a.mixed)
            try:
                status, data = post(addr, body, abort_after=abort, path=path)
            except Exception as e:  # a hang would show as a timeout here
                status, data = "error " + type(e).__name__, str(e).encode()
            if status == 200:
                wrong = answer_problems(path, body, data)
                if wrong:
                    status, data = "wrong", f"{'; '.join(wrong)}: {body}".encode()
            with lock:
                outcomes.setdefault(status, []).append(data[:300])
        finally:
            slots.release()

    threads = []
    for i in range(a.requests):
        slots.acquire()
        t = threading.Thread(target=one, args=(i,))
        t.start()
        threads.append(t)
    for t in threads:
        t.join()

    problems = []
    for status, bodies in sorted(outcomes.items(), key=lambda kv: str(kv[0])):
        print(f"{status}: {len(bodies)}")
        if status == 400:
            fields = {}
            for b in bodies:
                err = json.loads(b).get("error", {})
                if not err.get("param") or not err.get("message"):
                    problems.append(f"a refusal names no field: {b!r}")
                fields.setdefault(err.get("param"), err.get("message", "")[:120])
            for field, message in fields.items():
                print(f"  refused naming `{field}`, e.g. {message}")
        elif status not in (200, "aborted"):
            problems.append(f"{len(bodies)} requests ended {status}: {bodies[0]!r}")
    # Every client is done; a request whose client hung up is cancelled at
    # its next step. Wait (up to --idle-secs) for the server to be idle.
    def busy():
        metrics = urllib.request.urlopen(f"http://{a.host}:{a.port}/metrics").read().decode()
        values = {}
        for line in metrics.splitlines():
            if line.startswith("parallm_") and " " in line:
                name, value = line.rsplit(" ", 1)
                values[name] = float(value)
        return values, {name: value for name, value in values.items()
                        if value != 0 and (name in ("parallm_kv_blocks_used", "parallm_requests_running")
                                           or name.startswith("parallm_requests_waiting"))}

    t0 = time.monotonic()
    values, left = busy()
    while left and time.monotonic() - t0 < a.idle_secs:
        time.sleep(0.2)
        values, left = busy()
    print(f"idle {time.monotonic() - t0:.1f} s after the last client" if not left else
          f"not idle {a.idle_secs} s after the last client")
    for name, value in values.items():
        if name.startswith(("parallm_kv_blocks", "parallm_requests_running", "parallm_requests_waiting",
                            "parallm_prefix_cache_evictions", "parallm_spec_acceptance")):
            print(f"{name} {value:g}")
    for name, value in left.items():
        problems.append(f"at idle {name} is {value:g}")
    # The fixed prompt again, four at once, so that every replica of a
    # server with several gets one: each must come back, with the same text.
    # A replica stuck on a lost step would hold its request past the timeout.
    after = []

    def again():
        try:
            status, data = post(addr, fixed_body, timeout=120)
            after.append(json.loads(data)["choices"][0]["text"] if status == 200 else f"status {status}")
        except Exception as e:
            after.append(f"{type(e).__name__}: {e}")

    probes = [threading.Thread(target=again) for _ in range(4)]
    for t in probes:
        t.start()
    for t in probes:
        t.join()
    for text in after:
        if text != before:
            problems.append(f"the fixed greedy prompt, sent again, gave {text!r}, not {before!r}")
    if problems:
        print("\n".join(problems))
        sys.exit(1)
    print("every check held")


if __name__ == "__main__":
    main()
