#!/usr/bin/env python3
"""PyTorch + Hugging Face transformers anchor for our CUDA inference engine.

Builds synthetic Llama models from a config only (random weights, no download)
and measures, per shape, with `--warmup` untimed runs then `--runs` timed runs
(median reported, device synchronised around every timing):

* batch 1 decode tok/s: a prompt of `--prompt-tokens` random ids, greedy
  `generate` with a static KV cache, exactly N = `--output-tokens` new tokens.
  By default one StaticCache per batch size is kept and reset between calls, so
  its tensors keep their addresses and compiled CUDA graphs are replayed rather
  than re-recorded (transformers 5 otherwise builds a new cache every call);
  `--cache generate` passes `cache_implementation="static"` instead.
  Prefill is excluded by differencing:  decode = (N-1) / (t(N) - t(1)),
  where t(k) is the wall time of a whole k-token `generate`.
* batch B (`--batch`) output tok/s: B equal-length random prompts (no padding),
  N new tokens each; output = B*N / t(N) (prefill included), and the
  decode-only rate B*(N-1) / (t(N) - t(1)) like the batch-1 case.
* device copy bandwidth: `dst.copy_(src)` of a 1 GiB f16 tensor, median of 10.
  A copy of B bytes reads B and writes B bytes, so the device streams
  copy_rw_GBps = 2B/t; copy_one_side_GBps = B/t is reported as well.
* bandwidth limit: a decode step reads every weight once, except the input
  embedding table (only the looked-up rows), so weight_bytes_per_token =
  (params - embed params) * dtype size and limit_tok_s = (2B/t) / that
  (batch 1; KV-cache and activation traffic ignored).

Modes: default "eager" (transformers' automatic compilation of the static-cache
decode step is disabled); `--compile` applies the documented static-cache
recipe `model.forward = torch.compile(model.forward, mode="reduce-overhead",
fullgraph=True)`; `--compile hf-auto` lets `generate` compile on its own.

H100 runs (from the repository root):
    python3 benches/gpu/transformers_anchor.py --shape 1B,8B --json $OUT/transformers.json
    python3 benches/gpu/transformers_anchor.py --shape 1B,8B --compile --json $OUT/transformers_compiled.json
CPU smoke test:
    python3 benches/gpu/transformers_anchor.py --device cpu --shape test \\
        --output-tokens 8 --batch 4 --prompt-tokens 16 --runs 1
"""
import argparse
import contextlib
import gc
import inspect
import json
import platform
import statistics
import sys
import time

import torch
import torch._dynamo
import transformers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, StaticCache

SHAPES = {  # layers, hidden, heads, kv heads, intermediate
    "test": (2, 64, 4, 2, 128),
    "1B": (16, 2048, 32, 8, 8192),
    "8B": (32, 4096, 32, 8, 14336),
}
DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
CONVENTION = ("copy of B bytes reads B and writes B: copy_rw_GBps = 2B/t, copy_one_side_GBps = B/t; "
              "decode only reads weights: limit_tok_s = copy_rw_GBps*1e9 / weight_bytes_per_token; "
              "weight_bytes_per_token = (all params - input embedding table) * dtype bytes")


def log(*a):
    print(*a, flush=True)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def make_config(shape, vocab):
    layers, hidden, heads, kv, inter = SHAPES[shape]
    return LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096,
        rope_theta=500000.0, tie_word_embeddings=False, attn_implementation="sdpa",
        bos_token_id=None, eos_token_id=None, pad_token_id=None)


@contextlib.contextmanager
def default_dtype(dtype):
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(prev)


def build_model(cfg, dev, dtype, seed):
    """Construct directly on `dev` in `dtype`: default init (normal std 0.02) is fast there."""
    torch.manual_seed(seed)
    with default_dtype(dtype), dev:
        model = LlamaForCausalLM(cfg)
    model.eval()  # no .to(dtype): keeps the f32 RoPE inv_freq buffer, as from_pretrained does
    assert {p.dtype for p in model.parameters()} == {dtype}
    # No EOS at all: generation always runs the full N tokens.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = None
    return model


def copy_bandwidth(dev, runs=10, gib=1.0):
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=dev, dtype=torch.float16)
    dst = torch.empty_like(src)
    times = []
    for i in range(3 + runs):
        if dev.type == "cuda":  # events: no host round trip in the figure
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            dt = time.perf_counter() - t0
        if i >= 3:
            times.append(dt)
    del src, dst
    t, nbytes = statistics.median(times), n * 2
    return {"bytes": nbytes, "median_s": t, "copy_rw_GBps": 2 * nbytes / t / 1e9,
            "copy_one_side_GBps": nbytes / t / 1e9}


def make_cache(model, batch, max_len):
    """A static KV cache allocated now, kept across generate calls (reset before each)."""
    cfg, dev, dtype = model.config, model.device, model.dtype
    if "max_batch_size" in inspect.signature(StaticCache.__init__).parameters:  # transformers 4.4x
        return StaticCache(config=cfg, max_batch_size=batch, max_cache_len=max_len, device=dev, dtype=dtype)
    cache = StaticCache(config=cfg, max_cache_len=max_len)
    cache.early_initialization(batch, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads,
                               dtype, dev)
    return cache


def gen_kwargs(mode, cache):
    kw = dict(do_sample=False)
    if cache == "generate":
        kw["cache_implementation"] = "static"
    if mode != "hf-auto" and hasattr(GenerationConfig(), "disable_compile"):
        kw["disable_compile"] = True  # our own mode decides what is compiled
    return kw


def time_generate(model, ids, n, kw, dev, cache):
    mask = torch.ones_like(ids)
    if cache is not None:
        cache.reset()
        kw = dict(kw, past_key_values=cache)
    sync(dev)
    t0 = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, **kw)  # no_grad inside
    sync(dev)
    dt = time.perf_counter() - t0
    assert out.shape == (ids.shape[0], ids.shape[1] + n), out.shape
    return dt


def measure(model, batch, args, kw, dev):
    """Median wall time of an N-token and a 1-token generate at `batch`."""
    g = torch.Generator(device="cpu").manual_seed(args.seed + batch)
    ids = torch.randint(0, model.config.vocab_size, (batch, args.prompt_tokens), generator=g).to(dev)
    n = args.output_tokens
    cache = make_cache(model, batch, args.prompt_tokens + n) if args.cache == "persistent" else None
    for _ in range(args.warmup):  # N first: the static cache is then sized for N from the start
        time_generate(model, ids, n, kw, dev, cache)
        time_generate(model, ids, 1, kw, dev, cache)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    t_n, t_1 = [], []
    for _ in range(args.runs):
        t_n.append(time_generate(model, ids, n, kw, dev, cache))
        t_1.append(time_generate(model, ids, 1, kw, dev, cache))
    del cache
    tn, t1 = statistics.median(t_n), statistics.median(t_1)
    decode = batch * (n - 1) / (tn - t1) if tn > t1 else float("nan")
    return {"batch": batch, "prompt_tokens": args.prompt_tokens, "output_tokens": n,
            "t_generate_N_s": tn, "t_generate_1_s": t1, "runs_N_s": t_n, "runs_1_s": t_1,
            "output_tok_s": batch * n / tn, "decode_tok_s": decode,
            "compiled_during_timing": torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs}


def bench_shape(shape, args, dev, dtype, copy):
    cfg = make_config(shape, args.vocab)
    t0 = time.perf_counter()
    model = build_model(cfg, dev, dtype, args.seed)
    log(f"[{shape}] built in {time.perf_counter() - t0:.1f}s on {dev} ({dtype})")
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    wbytes = (params - embed) * torch.finfo(dtype).bits // 8
    if args.compile != "eager":  # batch 1 and B, prefill and decode: several graphs per shape
        for name in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, 64)
    if args.compile == "manual":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    kw = gen_kwargs(args.compile, args.cache)
    res = {"shape": shape, "layers": cfg.num_hidden_layers, "hidden": cfg.hidden_size,
           "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
           "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
           "params": params, "embed_params": embed, "weight_bytes_per_token": wbytes,
           "bw_limit_tok_s": copy["copy_rw_GBps"] * 1e9 / wbytes}
    res["batch1"] = measure(model, 1, args, kw, dev)
    log(f"[{shape}] batch 1 done: {res['batch1']['decode_tok_s']:.1f} decode tok/s")
    res["batchB"] = measure(model, args.batch, args, kw, dev)
    log(f"[{shape}] batch {args.batch} done: {res['batchB']['output_tok_s']:.1f} output tok/s")
    del model
    torch._dynamo.reset()  # compiled code and CUDA graphs hold on to the weights
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", action="append", help="test,1B,8B (repeatable or comma list; default 1B,8B)")
    ap.add_argument("--dtype", choices=DTYPES, default="f16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama-3: 128256)")
    ap.add_argument("--compile", nargs="?", const="manual", default="eager", choices=["eager", "manual", "hf-auto"])
    ap.add_argument("--cache", choices=["persistent", "generate"], default="persistent")
    ap.add_argument("--json", help="write all figures here")
    args = ap.parse_args()
    shapes = [s.strip() for a in (args.shape or ["1B,8B"]) for s in a.split(",") if s.strip()]
    bad = [s for s in shapes if s not in SHAPES]
    if bad or args.output_tokens < 2:
        ap.error(f"unknown shape(s) {bad}" if bad else "--output-tokens must be >= 2")
    transformers.logging.set_verbosity_error()
    dev, dtype = torch.device(args.device), DTYPES[args.dtype]
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    mode = {"eager": "eager (auto-compile disabled)",
            "manual": 'torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)',
            "hf-auto": "transformers automatic static-cache compile"}[args.compile]
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    log(f"torch {torch.__version__} (cuda {torch.version.cuda}), transformers {transformers.__version__}, "
        f"device {gpu or dev}, dtype {args.dtype}, mode {mode}, cache {args.cache}")

    copy = copy_bandwidth(dev)
    log(f"copy 1 GiB: {copy['median_s'] * 1e3:.3f} ms -> {copy['copy_rw_GBps']:.1f} GB/s read+write, "
        f"{copy['copy_one_side_GBps']:.1f} GB/s one side")
    results = [bench_shape(s, args, dev, dtype, copy) for s in shapes]

    b = args.batch
    head = f"{'shape':>5} {'b1 decode':>10} {'bw limit':>9} {'% limit':>7} {f'b{b} output':>11} {f'b{b} decode':>11}"
    log(f"\n{mode}; tok/s; prompt {args.prompt_tokens}, output {args.output_tokens}, median of {args.runs}")
    log(head)
    for r in results:
        d1, lim = r["batch1"]["decode_tok_s"], r["bw_limit_tok_s"]
        log(f"{r['shape']:>5} {d1:>10.1f} {lim:>9.1f} {100 * d1 / lim:>6.1f}% "
            f"{r['batchB']['output_tok_s']:>11.1f} {r['batchB']['decode_tok_s']:>11.1f}")
    if args.json:
        doc = {"bench": "transformers_anchor", "mode": args.compile, "mode_detail": mode, "cache": args.cache,
               "convention": CONVENTION, "torch": torch.__version__, "torch_cuda": torch.version.cuda,
               "transformers": transformers.__version__, "python": platform.python_version(),
               "device": str(dev), "gpu": gpu, "dtype": args.dtype, "attn_implementation": "sdpa",
               "rope_theta": 500000.0, "max_position_embeddings": 4096, "args": vars(args),
               "copy": copy, "results": results}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=2)
        log(f"wrote {args.json}")


if __name__ == "__main__":
    sys.exit(main())
