#!/usr/bin/env python3
"""openai_client.py - exercise an OpenAI-compatible server with the official client.

Called by parallm's Rust integration tests (cargo test --release --workspace),
run with the venv interpreter printed by tests/support/python-env.sh:

    "$(tests/support/python-env.sh | tail -n1)" tests/support/openai_client.py \
        --base-url http://127.0.0.1:PORT/v1 --model MODEL [--api-key KEY] \
        [--timeout SECS] [--skip CHECK ...] [--embed-model NAME]

Checks, in order (names as used by --skip and in the JSON summary):
  completion   completions.create(prompt="The capital of France is",
               max_tokens=8, temperature=0): exactly one choice, non-empty
               text, finish_reason in {stop, length}, 1 <= completion_tokens <= 8
  chat         chat.completions.create("What is 2+2?", max_tokens=16,
               temperature=0): role == "assistant", non-empty content
  stream       the same chat with stream=True and
               stream_options={"include_usage": True}: chunks with delta
               content arrive, concatenated content non-empty, the last chunk
               carries usage with completion_tokens > 0
  models       models.list() contains MODEL
  bad_request  a chat request with temperature=-1 raises openai.BadRequestError
  structured   the client's structured-output helper (chat.completions.parse,
               or beta.chat.completions.parse in older clients) with a
               pydantic model: the answer parses into the model, and an
               unsatisfiable schema raises BadRequestError naming
               response_format
  tools        the tool-call round trip: tool_choice="required" answers with
               a call of the defined function whose arguments parse; the
               assistant message and a role "tool" result sent back get a
               final answer over a longer prompt
  embeddings   (only with --embed-model) embeddings.create over two texts
               with encoding_format="float": two unit vectors of one width
               and the usage; one text without encoding_format (the client
               asks for base64 and decodes it) equals its float answer

Output: exactly one JSON line on stdout: {"ok": bool, "failed": [names],
"checks": {name: {"ok": bool, ...details or "error"}}, ...}. Each failure is
also described on stderr as "FAIL <check>: <reason>". Exit status 0 only if
every (non-skipped) check passed, 1 otherwise, 2 for bad usage.
"""

import argparse
import json
import sys
import time
import traceback

CHECK_NAMES = ("completion", "chat", "stream", "models", "bad_request", "structured", "tools",
               "embeddings")


class CheckFailed(Exception):
    pass


def expect(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def usage_dict(usage):
    if usage is None:
        return None
    return {
        "prompt_tokens": getattr(usage, "prompt_tokens", None),
        "completion_tokens": getattr(usage, "completion_tokens", None),
        "total_tokens": getattr(usage, "total_tokens", None),
    }


def check_completion(client, model, details):
    resp = client.completions.create(
        model=model,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
    )
    expect(resp.choices is not None, "response has no choices")
    details["n_choices"] = len(resp.choices)
    expect(len(resp.choices) == 1, f"expected 1 choice, got {len(resp.choices)}")
    choice = resp.choices[0]
    details["text"] = choice.text
    details["finish_reason"] = choice.finish_reason
    details["usage"] = usage_dict(resp.usage)
    expect(isinstance(choice.text, str) and choice.text != "", f"empty text: {choice.text!r}")
    expect(
        choice.finish_reason in ("stop", "length"),
        f"finish_reason {choice.finish_reason!r} not in {{stop, length}}",
    )
    expect(resp.usage is not None, "response has no usage")
    ct = resp.usage.completion_tokens
    expect(isinstance(ct, int) and 1 <= ct <= 8, f"usage.completion_tokens={ct!r} not in [1, 8]")


def check_chat(client, model, details):
    resp = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=16,
        temperature=0,
    )
    expect(resp.choices, "response has no choices")
    msg = resp.choices[0].message
    details["role"] = msg.role
    details["content"] = msg.content
    details["finish_reason"] = resp.choices[0].finish_reason
    details["usage"] = usage_dict(resp.usage)
    expect(msg.role == "assistant", f"message.role={msg.role!r}, expected 'assistant'")
    expect(isinstance(msg.content, str) and msg.content != "", f"empty content: {msg.content!r}")


def check_stream(client, model, details):
    n_chunks = 0
    n_content_chunks = 0
    parts = []
    finish_reason = None
    last = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is 2+2?"}],
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        for chunk in stream:
            n_chunks += 1
            last = chunk
            for choice in chunk.choices or []:
                delta = choice.delta
                if delta is not None and delta.content:
                    n_content_chunks += 1
                    parts.append(delta.content)
                if choice.finish_reason is not None:
                    finish_reason = choice.finish_reason
    content = "".join(parts)
    details["chunks"] = n_chunks
    details["content_chunks"] = n_content_chunks
    details["content"] = content
    details["finish_reason"] = finish_reason
    details["last_chunk_usage"] = usage_dict(last.usage) if last is not None else None
    expect(n_chunks > 0, "no chunks received")
    expect(n_content_chunks > 0, "no chunk carried delta.content")
    expect(content != "", "concatenated content is empty")
    expect(last.usage is not None, "last chunk carries no usage (stream_options.include_usage)")
    ct = last.usage.completion_tokens
    expect(isinstance(ct, int) and ct > 0, f"last chunk usage.completion_tokens={ct!r}, expected > 0")


def check_models(client, model, details):
    ids = [m.id for m in client.models.list()]
    details["ids"] = ids
    expect(model in ids, f"model {model!r} not in models.list(): {ids!r}")


def check_bad_request(client, model, details):
    import openai

    try:
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "What is 2+2?"}],
            max_tokens=4,
            temperature=-1,
        )
    except openai.BadRequestError as e:
        details["status_code"] = e.status_code
        details["message"] = str(e)[:300]
        return
    except openai.APIStatusError as e:
        details["status_code"] = e.status_code
        raise CheckFailed(
            f"temperature=-1 raised {type(e).__name__} (HTTP {e.status_code}), "
            "expected openai.BadRequestError (HTTP 400)"
        )
    content = resp.choices[0].message.content if resp.choices else None
    details["content"] = content
    raise CheckFailed("temperature=-1 was accepted (HTTP 2xx); expected openai.BadRequestError (HTTP 400)")


def check_structured(client, model, details):
    import openai
    import pydantic

    class City(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=24)
        country: str = pydantic.Field(max_length=24)
        population_millions: int = pydantic.Field(ge=0, le=100)

    parse = getattr(client.chat.completions, "parse", None)
    if parse is None:
        parse = client.beta.chat.completions.parse
    resp = parse(
        model=model,
        messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City,
        max_tokens=96,
        temperature=0,
    )
    msg = resp.choices[0].message
    details["content"] = msg.content
    details["finish_reason"] = resp.choices[0].finish_reason
    expect(resp.choices[0].finish_reason == "stop", f"finish_reason {resp.choices[0].finish_reason!r}")
    expect(isinstance(msg.parsed, City), f"parsed is {type(msg.parsed).__name__}, not City")
    expect(len(msg.parsed.name) <= 24, "name longer than the schema allows")
    try:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "bad", "schema": {"$ref": "#/nowhere"}},
            },
            max_tokens=4,
        )
    except openai.BadRequestError as e:
        details["bad_schema"] = str(e)[:200]
        expect("response_format" in str(e), f"error does not name response_format: {e}")
    else:
        raise CheckFailed("an unsatisfiable schema was accepted")


def check_tools(client, model, details):
    import json

    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 24}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(
        model=model, messages=messages, tools=tools, tool_choice="required",
        parallel_tool_calls=False, max_tokens=64, temperature=0,
    )
    msg = first.choices[0].message
    expect(first.choices[0].finish_reason == "tool_calls",
           f"finish_reason {first.choices[0].finish_reason!r}")
    expect(bool(msg.tool_calls), "no tool_calls in the answer")
    call = msg.tool_calls[0]
    args = json.loads(call.function.arguments)
    details["call"] = {"id": call.id, "name": call.function.name, "arguments": args}
    expect(call.function.name == "get_weather", f"called {call.function.name!r}")
    expect(isinstance(args.get("city"), str), f"arguments {args!r}")
    messages.append(msg.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"temperature_c": 21, "sky": "clear"})})
    final = client.chat.completions.create(
        model=model, messages=messages, tools=tools, max_tokens=32, temperature=0,
    )
    answer = final.choices[0].message
    details["final"] = answer.content
    details["final_finish_reason"] = final.choices[0].finish_reason
    expect(final.usage.prompt_tokens > first.usage.prompt_tokens,
           "the tool result did not reach the prompt")
    expect(bool(answer.content) or bool(answer.tool_calls), "an empty final answer")


def check_embeddings(client, model, details, embed_model=None):
    """client.embeddings.create: floats, the client's default base64, and a
    list of inputs, each a vector of the model's width with unit norm."""
    if embed_model is None:
        raise CheckFailed("no --embed-model given")
    texts = ["hello world", "The quick brown fox jumps over the lazy dog."]
    r = client.embeddings.create(model=embed_model, input=texts, encoding_format="float")
    expect(len(r.data) == 2 and [d.index for d in r.data] == [0, 1], f"data {r.data!r}")
    width = len(r.data[0].embedding)
    expect(width > 0 and all(len(d.embedding) == width for d in r.data), "widths differ")
    for d in r.data:
        norm = sum(x * x for x in d.embedding) ** 0.5
        expect(abs(norm - 1.0) < 1e-4, f"norm {norm}")
    expect(r.usage.prompt_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens,
           f"usage {r.usage!r}")
    # Without encoding_format the client asks for base64 and decodes it.
    b = client.embeddings.create(model=embed_model, input=texts[0])
    diff = max(abs(x - y) for x, y in zip(b.data[0].embedding, r.data[0].embedding))
    expect(diff == 0.0, f"base64 and float answers differ by {diff}")
    details["width"] = width


CHECKS = {
    "completion": check_completion,
    "chat": check_chat,
    "stream": check_stream,
    "models": check_models,
    "bad_request": check_bad_request,
    "structured": check_structured,
    "tools": check_tools,
    "embeddings": check_embeddings,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    ap.add_argument("--model", required=True)
    ap.add_argument("--api-key", default=None, help='defaults to "none"')
    ap.add_argument("--embed-model", default=None,
                    help="an embedding model to check /v1/embeddings with (else that check is skipped)")
    ap.add_argument("--timeout", type=float, default=120.0, help="per-request timeout, seconds")
    ap.add_argument(
        "--skip", action="append", default=[], choices=CHECK_NAMES, help="skip a check (repeatable)"
    )
    args = ap.parse_args(argv)

    summary = {"ok": False, "base_url": args.base_url, "model": args.model, "failed": [], "checks": {}}
    try:
        import openai
    except Exception as e:  # noqa: BLE001
        summary["error"] = f"cannot import openai: {e!r}"
        print(f"FAIL setup: cannot import openai: {e!r}", file=sys.stderr)
        print(json.dumps(summary))
        return 1
    summary["openai_version"] = openai.__version__

    client = openai.OpenAI(
        base_url=args.base_url,
        api_key=args.api_key or "none",
        timeout=args.timeout,
        max_retries=0,
        # Talk to the loopback server directly, ignoring any HTTP(S)_PROXY.
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )

    for name in CHECK_NAMES:
        if name in args.skip or (name == "embeddings" and args.embed_model is None):
            summary["checks"][name] = {"ok": None, "skipped": True}
            continue
        details = {}
        t0 = time.monotonic()
        try:
            if name == "embeddings":
                check_embeddings(client, args.model, details, args.embed_model)
            else:
                CHECKS[name](client, args.model, details)
            details["ok"] = True
        except CheckFailed as e:
            details["ok"] = False
            details["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - report any client/server error
            details["ok"] = False
            details["error"] = f"{type(e).__name__}: {e}"
            details["traceback"] = traceback.format_exc(limit=3)
        details["secs"] = round(time.monotonic() - t0, 3)
        summary["checks"][name] = {"ok": details.pop("ok"), **details}
        if not summary["checks"][name]["ok"]:
            summary["failed"].append(name)
            print(f"FAIL {name}: {details['error']}", file=sys.stderr)

    summary["ok"] = not summary["failed"]
    print(json.dumps(summary))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
