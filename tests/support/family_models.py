#!/usr/bin/env python3
"""Writes the tiny random-weight GGUF models of each family the tests compare
against llama.cpp (tests/families.rs, tests/golden/families.json).

    family_models.py REFERENCE.gguf OUT_DIR

Each model is small (2-3 layers, hidden 64) with f32 weights and the
reference model's real vocabulary (SmolLM2's byte-level BPE, 49152 tokens),
copied from REFERENCE.gguf, so the engine can load and tokenize it like any
model. Weights come from splitmix64 keyed by the tensor's name, in numpy's
64-bit integer arithmetic, so the bytes written do not depend on numpy's
random generators, and the rest from IEEE arithmetic only (+, *, /, sqrt),
never from numpy's transcendental functions, whose SIMD versions round
differently on different CPUs; with the pinned `gguf` package (tests/support/
python-env.sh) the files are the same on every machine, and the golden file
records their SHA-256.

What each model exercises (the pre-tokenizer is the family's, over the
same vocabulary):
  llama-r3   Llama 3's rope scaling (rope_freqs.weight), an untied LM head,
             pre-tokenizer llama-bpe
  llama-lin  linear rope scaling (rope.scaling.factor 2), a tied LM head,
             pre-tokenizer smollm
  qwen2      q/k/v biases, NeoX rope, a tied LM head, pre-tokenizer qwen2
  qwen3      per-head q/k RMSNorm, head_dim 32 wider than hidden / heads,
             NeoX rope, 3 layers, pre-tokenizer qwen2
  phi3       fused attn_qkv and gate|up in ffn_up, NeoX rope, 3 heads of 32
  llama-spm  a SentencePiece vocabulary (tokenizer.ggml.model = llama) made
             from the reference's: scores, byte fallback, add_space_prefix, BOS
  gemma2     embeddings × √hidden, post-norms, GELU gating, soft-capped
             attention (5) and logits (10), every other layer windowed (8)
  gemma3     q/k norms, post-norms, GELU gating, windows of 6 on five layers
             of six with their own rope (base 10000), linear rope ×8 on the
             global ones, SentencePiece
  qwen2-yarn qwen2 with YaRN rope scaling (factor 4 over an original context of 16)
  llama-tekken
             llama-lin with Mistral Nemo's pre-tokenizer (tekken: whole-word
             tokens without merging) and no add_bos_token key (BOS by default)
  gpt2       learned position embeddings, LayerNorm with biases, fused
             attn_qkv with its bias, biases on attn_output, ffn_up and
             ffn_down, an ungated GELU FFN, a tied LM head, pre-tokenizer gpt-2
  phi3-long  phi3 as Phi-4-mini and Phi-3.5-mini are: a partial rotary
             embedding (24 of 32 dims) and LongRoPE (rope_factors_long and
             _short, rope.scaling.attn_factor), with an original context of
             64 below the 512 it runs with: the long factors
  phi3-short the same with an original context of 512: the short factors
  llama-gpt4o
             llama-lin with GPT-4o's pre-tokenizer (Phi-4's: case changes,
             contractions, digits in threes)
  phi3-spm   phi3 with the SentencePiece vocabulary and a name that says
             Phi-3, for which llama.cpp (as Phi-3's own tokenizer) drops the
             whitespace after special tokens
  phi3-q8_0, qwen2-q4_0, gemma3-q8_0, gpt2-q8_0
             the same with every matrix quantized (fused rows cut from
             quantized blocks, biases over quantized matmuls)
  llama-r3-f16, qwen2-bf16
             the same with every matrix in f16 or bf16
"""

import os
import sys

import numpy as np
import gguf

MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def splitmix(name: str, n: int) -> np.ndarray:
    """n uniform floats in [-1, 1) from splitmix64 seeded by name's FNV-1a."""
    seed = 0xCBF29CE484222325
    for b in name.encode():
        seed = ((seed ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    with np.errstate(over="ignore"):
        x = np.uint64(seed) + np.arange(1, n + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    # 24 random bits: exact in f32.
    return ((x >> np.uint64(40)).astype(np.float32) / np.float32(1 << 23)) - np.float32(1.0)


def matrix(name, rows, cols, gain=1.0):
    # Uniform with the variance of N(0, gain²/cols).
    scale = np.float32(gain * np.sqrt(3.0 / cols))
    return (splitmix(name, rows * cols) * scale).reshape(rows, cols)


def around_one(name, n, spread):
    return np.float32(1.0) + splitmix(name, n) * np.float32(spread)


MODELS = {
    "llama-r3": dict(arch="llama", layers=2, hidden=64, heads=4, kv=2, head_dim=16, ffn=128,
                     tied=False, rope_freqs=True, pre="llama-bpe"),
    "llama-lin": dict(arch="llama", layers=2, hidden=64, heads=4, kv=2, head_dim=16, ffn=128,
                      tied=True, linear=2.0),
    "qwen2": dict(arch="qwen2", layers=2, hidden=64, heads=4, kv=2, head_dim=16, ffn=128,
                  tied=True, bias=True, rope_base=1_000_000.0, pre="qwen2"),
    "qwen3": dict(arch="qwen3", layers=3, hidden=64, heads=4, kv=2, head_dim=32, ffn=96,
                  tied=False, qk_norm=True, rope_base=1_000_000.0, key_length=True, pre="qwen2"),
    "phi3": dict(arch="phi3", layers=2, hidden=96, heads=3, kv=3, head_dim=32, ffn=128,
                 tied=False, fused=True),
    "llama-spm": dict(arch="llama", layers=2, hidden=64, heads=4, kv=4, head_dim=16, ffn=128,
                      tied=False, spm=True),
    "gemma2": dict(arch="gemma2", layers=3, hidden=64, heads=4, kv=2, head_dim=32, ffn=128,
                   tied=True, key_length=True, gemma=True, window=8, attn_softcap=5.0,
                   final_softcap=10.0),
    "gemma3": dict(arch="gemma3", layers=7, hidden=64, heads=4, kv=2, head_dim=32, ffn=96,
                   tied=True, key_length=True, gemma=True, qk_norm=True, window=6,
                   rope_base=1_000_000.0, linear=8.0, spm=True),
}
MODELS["gpt2"] = dict(arch="gpt2", layers=2, hidden=64, heads=4, kv=4, head_dim=16, ffn=256,
                      tied=True, pre="gpt-2")
MODELS["llama-tekken"] = dict(MODELS["llama-lin"], pre="tekken",
                              drop=["tokenizer.ggml.add_bos_token"])
# YaRN: a factor of 4 over an original context of 16, shorter than the prompts.
MODELS["qwen2-yarn"] = dict(MODELS["qwen2"], yarn=(4.0, 16))
# LongRoPE over 24 of 32 dims; sqrt(1 + ln 8 / ln 64) is what llama.cpp's
# converter writes for a context of 8 x 64.
MODELS["phi3-long"] = dict(MODELS["phi3"], rot=24, longrope=(64, 1.2247449))
MODELS["phi3-short"] = dict(MODELS["phi3"], rot=24, longrope=(512, 1.2247449))
MODELS["phi3-spm"] = dict(MODELS["phi3"], spm=True, named=True)
MODELS["llama-gpt4o"] = dict(MODELS["llama-lin"], pre="gpt-4o")
# Quantized copies (every matrix; norms, biases and rope factors stay f32),
# by the gguf package's own quantizer.
for base, quant in [("phi3", "Q8_0"), ("qwen2", "Q4_0"), ("gemma3", "Q8_0"), ("gpt2", "Q8_0"),
                    ("llama-r3", "F16"), ("qwen2", "BF16")]:
    MODELS[f"{base}-{quant.lower()}"] = dict(MODELS[base], quant=quant)


def gpt2_byte_decoder():
    """GPT-2's printable character of each byte, reversed."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
          + list(range(ord("\u00ae"), ord("\u00ff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def spm_fields(tok):
    """A SentencePiece vocabulary made from the reference's BPE one: <unk>,
    <s>, </s>, the 256 byte tokens, its control tokens, then every normal
    token whose bytes are printable UTF-8, spaces spelled \u2581, scored by
    rank (earlier merges score higher)."""
    get = {k: v for k, v, _, _ in tok}
    dec = gpt2_byte_decoder()
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    scores = [0.0] * len(tokens)
    seen = set(tokens)
    for t, ty in zip(get["tokenizer.ggml.tokens"], get["tokenizer.ggml.token_type"]):
        if ty == 3 and t not in seen:
            tokens.append(t)
            types.append(3)
            scores.append(0.0)
            seen.add(t)
    for rank, (t, ty) in enumerate(zip(get["tokenizer.ggml.tokens"], get["tokenizer.ggml.token_type"])):
        if ty != 1:
            continue
        try:
            text = bytes(dec[c] for c in t).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            continue
        piece = text.replace(" ", "\u2581")
        if piece in seen:
            continue
        tokens.append(piece)
        types.append(1)
        scores.append(-float(rank))
        seen.add(piece)
    A, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
    return [
        ("tokenizer.ggml.model", "llama", S, None),
        ("tokenizer.ggml.tokens", tokens, A, S),
        ("tokenizer.ggml.scores", scores, A, gguf.GGUFValueType.FLOAT32),
        ("tokenizer.ggml.token_type", types, A, gguf.GGUFValueType.INT32),
        ("tokenizer.ggml.unknown_token_id", 0, gguf.GGUFValueType.UINT32, None),
        ("tokenizer.ggml.bos_token_id", 1, gguf.GGUFValueType.UINT32, None),
        ("tokenizer.ggml.eos_token_id", 2, gguf.GGUFValueType.UINT32, None),
        ("tokenizer.ggml.add_bos_token", True, gguf.GGUFValueType.BOOL, None),
        ("tokenizer.ggml.add_eos_token", False, gguf.GGUFValueType.BOOL, None),
        ("tokenizer.ggml.add_space_prefix", True, gguf.GGUFValueType.BOOL, None),
        ("tokenizer.chat_template", get["tokenizer.chat_template"], S, None),
    ]


def tokenizer_fields(reader):
    """The reference model's tokenizer keys, as (key, value, type)."""
    out = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            sub = field.types[1]
            if sub == gguf.GGUFValueType.STRING:
                value = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
            else:
                value = [field.parts[i].tolist()[0] for i in field.data]
            out.append((key, value, kind, sub))
        elif kind == gguf.GGUFValueType.STRING:
            out.append((key, bytes(field.parts[field.data[0]]).decode("utf-8"), kind, None))
        else:
            out.append((key, field.parts[field.data[0]].tolist()[0], kind, None))
    return out


def write(name, spec, tok, out_dir):
    arch = spec["arch"]
    path = os.path.join(out_dir, f"{name}.gguf")
    tmp = path + ".part"
    w = gguf.GGUFWriter(tmp, arch)
    # Not "phi3" (but for the model that tests it): llama.cpp gives the
    # special tokens of a model so named Phi-3's whitespace stripping, and
    # looks up Phi-3's "</s>", which only the SentencePiece vocabulary has.
    w.add_name("parallm-tiny-" + (name if spec.get("named") else name.replace("phi3", "fused")))
    h, hd, L = spec["hidden"], spec["head_dim"], spec["layers"]
    nh, nkv, ffn = spec["heads"], spec["kv"], spec["ffn"]
    if spec.get("spm"):
        tok = spm_fields(tok)
    vocab = len(next(v for k, v, _, _ in tok if k == "tokenizer.ggml.tokens"))
    w.add_block_count(L)
    w.add_context_length(512)
    w.add_embedding_length(h)
    w.add_feed_forward_length(ffn)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    gpt2 = arch == "gpt2"
    if gpt2:
        w.add_layer_norm_eps(1e-5)
    else:
        w.add_layer_norm_rms_eps(1e-6)
        w.add_rope_freq_base(spec.get("rope_base", 10_000.0))
        w.add_rope_dimension_count(spec.get("rot", hd))
    w.add_vocab_size(vocab)
    if spec.get("key_length"):
        w.add_key_length(hd)
        w.add_value_length(hd)
    if "linear" in spec:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec["linear"])
    if "yarn" in spec:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(spec["yarn"][0])
        w.add_rope_scaling_orig_ctx_len(spec["yarn"][1])
    if "longrope" in spec:
        w.add_rope_scaling_orig_ctx_len(spec["longrope"][0])
        w.add_rope_scaling_attn_factors(spec["longrope"][1])
    if "window" in spec:
        w.add_sliding_window(spec["window"])
    if "attn_softcap" in spec:
        w.add_attn_logit_softcapping(spec["attn_softcap"])
    if "final_softcap" in spec:
        w.add_final_logit_softcapping(spec["final_softcap"])
    quant = spec.get("quant")
    w.add_file_type({None: gguf.LlamaFileType.ALL_F32, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                     "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "F16": gguf.LlamaFileType.MOSTLY_F16,
                     "BF16": gguf.LlamaFileType.MOSTLY_BF16}[quant])
    for key, value, kind, sub in tok:
        if key in spec.get("drop", []):
            continue
        if key == "tokenizer.ggml.pre" and "pre" in spec:
            value = spec["pre"]
        if kind == gguf.GGUFValueType.ARRAY:
            # Python floats are written as f32, ints as i32, as the
            # reference's own arrays are.
            w.add_array(key, value)
        else:
            w.add_key_value(key, value, kind)

    t = {}
    t["token_embd.weight"] = splitmix("token_embd.weight", vocab * h).reshape(vocab, h)
    t["output_norm.weight"] = around_one("output_norm.weight", h, 0.2)
    if not spec["tied"]:
        t["output.weight"] = matrix("output.weight", vocab, h, gain=3.0)
    else:
        # A tied head reads the embedding: give it the head's spread.
        t["token_embd.weight"] *= np.float32(3.0 * np.sqrt(3.0 / h))
    if spec.get("rope_freqs"):
        # Llama 3's factors: 1 for high frequencies, up to 8 for low ones.
        r = np.arange(hd // 2, dtype=np.float32) / np.float32(hd // 2 - 1)
        t["rope_freqs.weight"] = np.float32(1.0) + np.float32(7.0) * (r * r)
    if "longrope" in spec:
        # Phi-3's shapes: long factors growing to ~20 for low frequencies,
        # short ones near 1.
        i = np.arange(spec["rot"] // 2, dtype=np.float32) / np.float32(spec["rot"] // 2 - 1)
        # The cube as products in f64, then rounded to f32: IEEE arithmetic,
        # the same bits everywhere (`i ** 3` goes through numpy's SIMD pow,
        # whose last bit differs between AVX-512 and AVX2 machines, and so
        # did the file).
        d = i.astype(np.float64)
        cube = (d * d * d).astype(np.float32)
        t["rope_factors_long.weight"] = np.float32(1.0) + np.float32(19.0) * cube
        t["rope_factors_short.weight"] = np.float32(1.0) + np.float32(0.2) * i
    if gpt2:
        t["position_embd.weight"] = splitmix("position_embd.weight", 512 * h).reshape(512, h) * np.float32(0.5)
        t["output_norm.bias"] = splitmix("output_norm.bias", h) * np.float32(0.2)
    for b in range(L):
        p = f"blk.{b}."
        if gpt2:
            for n in ["attn_norm", "ffn_norm"]:
                t[p + n + ".weight"] = around_one(p + n + ".weight", h, 0.2)
                t[p + n + ".bias"] = splitmix(p + n + ".bias", h) * np.float32(0.2)
            t[p + "attn_qkv.weight"] = np.concatenate([
                matrix(p + "attn_q.weight", nh * hd, h, gain=2.0),
                matrix(p + "attn_k.weight", nkv * hd, h, gain=2.0),
                matrix(p + "attn_v.weight", nkv * hd, h)])
            t[p + "attn_qkv.bias"] = splitmix(p + "attn_qkv.bias", (nh + 2 * nkv) * hd) * np.float32(0.5)
            t[p + "attn_output.weight"] = matrix(p + "attn_output.weight", h, nh * hd)
            t[p + "attn_output.bias"] = splitmix(p + "attn_output.bias", h) * np.float32(0.2)
            t[p + "ffn_up.weight"] = matrix(p + "ffn_up.weight", ffn, h, gain=2.0)
            t[p + "ffn_up.bias"] = splitmix(p + "ffn_up.bias", ffn) * np.float32(0.5)
            t[p + "ffn_down.weight"] = matrix(p + "ffn_down.weight", h, ffn)
            t[p + "ffn_down.bias"] = splitmix(p + "ffn_down.bias", h) * np.float32(0.2)
            continue
        t[p + "attn_norm.weight"] = around_one(p + "attn_norm.weight", h, 0.2)
        q = matrix(p + "attn_q.weight", nh * hd, h, gain=2.0)
        k = matrix(p + "attn_k.weight", nkv * hd, h, gain=2.0)
        v = matrix(p + "attn_v.weight", nkv * hd, h)
        if spec.get("fused"):
            t[p + "attn_qkv.weight"] = np.concatenate([q, k, v])
        else:
            t[p + "attn_q.weight"], t[p + "attn_k.weight"], t[p + "attn_v.weight"] = q, k, v
        t[p + "attn_output.weight"] = matrix(p + "attn_output.weight", h, nh * hd)
        if spec.get("bias"):
            t[p + "attn_q.bias"] = splitmix(p + "attn_q.bias", nh * hd) * np.float32(0.5)
            t[p + "attn_k.bias"] = splitmix(p + "attn_k.bias", nkv * hd) * np.float32(0.5)
            t[p + "attn_v.bias"] = splitmix(p + "attn_v.bias", nkv * hd) * np.float32(0.5)
        if spec.get("qk_norm"):
            t[p + "attn_q_norm.weight"] = around_one(p + "attn_q_norm.weight", hd, 0.3)
            t[p + "attn_k_norm.weight"] = around_one(p + "attn_k_norm.weight", hd, 0.3)
        t[p + "ffn_norm.weight"] = around_one(p + "ffn_norm.weight", h, 0.2)
        if spec.get("gemma"):
            # GGUF's Gemma norms already hold 1 + w.
            t[p + "post_attention_norm.weight"] = around_one(p + "post_attention_norm.weight", h, 0.2)
            t[p + "post_ffw_norm.weight"] = around_one(p + "post_ffw_norm.weight", h, 0.2)
        gate = matrix(p + "ffn_gate.weight", ffn, h)
        up = matrix(p + "ffn_up.weight", ffn, h)
        if spec.get("fused"):
            t[p + "ffn_up.weight"] = np.concatenate([gate, up])
        else:
            t[p + "ffn_gate.weight"], t[p + "ffn_up.weight"] = gate, up
        t[p + "ffn_down.weight"] = matrix(p + "ffn_down.weight", h, ffn)
    for k in sorted(t):
        data = np.ascontiguousarray(t[k], dtype=np.float32)
        if quant and data.ndim == 2:
            qtype = gguf.GGMLQuantizationType[quant]
            w.add_tensor(k, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(k, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    reference, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    tok = tokenizer_fields(gguf.GGUFReader(reference))
    for name, spec in MODELS.items():
        print(write(name, spec, tok, out_dir))


if __name__ == "__main__":
    main()
