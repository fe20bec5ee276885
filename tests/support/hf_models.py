#!/usr/bin/env python3
"""Writes the tiny random-weight Hugging Face model directories the tests
compare against HF transformers (tests/hf_models.rs, tests/golden/hf.json).

    hf_models.py REFERENCE.gguf OUT_DIR

Each directory is what `save_pretrained` writes for a causal LM: config.json,
the weights as model.safetensors (or two shards and
model.safetensors.index.json), tokenizer.json, tokenizer_config.json with
the chat template, and generation_config.json. The tokenizer is the
reference model's (SmolLM2's byte-level BPE, 49152 tokens, read from
REFERENCE.gguf with the `gguf` package) written as a `tokenizers` JSON file.

Weights come from splitmix64 keyed by the tensor's Hugging Face name, in
numpy's 64-bit integer arithmetic, and are rounded to f16 (numpy) or bf16
(round to nearest even on the bits) here; the safetensors files are written
by hand (an 8-byte header length, the JSON header, the data), so the bytes
are the same on every machine without torch, and the golden file records
their SHA-256.

  llama-f16    LlamaForCausalLM, f16, GQA (4 heads, 2 KV), an untied head,
               Llama 3 rope scaling, BOS added by the post-processor
  llama-bf16   the same weights in bf16, in two shards with an index
  qwen2-bf16   Qwen2ForCausalLM, bf16, q/k/v biases, a tied head, Qwen2's
               pre-tokenizer (a Split regex)
  qwen3-f16    Qwen3ForCausalLM, f16, per-head q/k norms, head_dim 32, Qwen2's
               pre-tokenizer
  phi3-f32     Phi3ForCausalLM, f32, fused qkv_proj and gate_up_proj
  gpt2-f16     GPT2LMHeadModel, f16: transposed Conv1D matrices, learned
               positions, LayerNorms with biases, GPT-2's own config names
               and byte-level pre-tokenizer
  gemma2-bf16  Gemma2ForCausalLM, bf16: norms stored as w for 1 + w, pre and
               post norms, soft-caps 5 and 10, every other layer windowed (8),
               a query scale of 1/sqrt(24) (query_pre_attn_scalar), head_dim 32
  gemma3-f16   Gemma3ForCausalLM, f16: q/k norms, 7 layers with windows of 6
               on all but layer 5 (layer_types), the windowed layers' rope
               base 10000 against 1e6 with linear scaling ×8 on the global one
"""

import json
import os
import sys

import numpy as np
import gguf

# The same deterministic weights as the GGUF families.
from family_models import around_one, matrix, splitmix

BASE = dict(layers=2, hidden=64, heads=4, kv=2, head_dim=16, ffn=128)
MODELS = {
    "llama-f16": dict(BASE, arch="LlamaForCausalLM", model_type="llama", dtype="F16",
                      tied=False, llama3=True, bos_post=True),
    "llama-bf16": dict(BASE, arch="LlamaForCausalLM", model_type="llama", dtype="BF16",
                       tied=False, llama3=True, bos_post=True, shards=2),
    "qwen2-bf16": dict(BASE, arch="Qwen2ForCausalLM", model_type="qwen2", dtype="BF16",
                       tied=True, bias=True, rope_base=1_000_000.0),
    "qwen3-f16": dict(BASE, layers=3, head_dim=32, ffn=96, arch="Qwen3ForCausalLM",
                      model_type="qwen3", dtype="F16", tied=False, qk_norm=True,
                      rope_base=1_000_000.0),
    "phi3-f32": dict(BASE, hidden=96, heads=3, kv=3, head_dim=32, arch="Phi3ForCausalLM",
                     model_type="phi3", dtype="F32", tied=False, fused=True),
    "gpt2-f16": dict(BASE, kv=4, ffn=256, arch="GPT2LMHeadModel", model_type="gpt2",
                     dtype="F16", tied=True),
    "gemma2-bf16": dict(BASE, layers=3, head_dim=32, arch="Gemma2ForCausalLM",
                        model_type="gemma2", dtype="BF16", tied=True, gemma=True),
    "gemma3-f16": dict(BASE, layers=7, head_dim=32, ffn=96, arch="Gemma3ForCausalLM",
                       model_type="gemma3_text", dtype="F16", tied=True, gemma=True,
                       qk_norm=True, rope_base=1_000_000.0),
}


def read_vocab(reference):
    r = gguf.GGUFReader(reference)

    def field(key):
        f = r.fields[key]
        if f.types[0] == gguf.GGUFValueType.ARRAY:
            if f.types[1] == gguf.GGUFValueType.STRING:
                return [bytes(f.parts[i]).decode("utf-8") for i in f.data]
            return [f.parts[i].tolist()[0] for i in f.data]
        if f.types[0] == gguf.GGUFValueType.STRING:
            return bytes(f.parts[f.data[0]]).decode("utf-8")
        return f.parts[f.data[0]].tolist()[0]

    return dict(tokens=field("tokenizer.ggml.tokens"), types=field("tokenizer.ggml.token_type"),
                merges=field("tokenizer.ggml.merges"),
                template=field("tokenizer.chat_template"))


# Qwen2's pre-tokenization pattern, as its tokenizer.json (and transformers'
# Qwen2Tokenizer, which sets it whatever the file says) has it.
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def tokenizer_json(vocab, bos_post, qwen, gpt2=False):
    added = [dict(id=i, content=t, single_word=False, lstrip=False, rstrip=False,
                  normalized=False, special=True)
             for i, (t, kind) in enumerate(zip(vocab["tokens"], vocab["types"])) if kind == 3]
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=True, use_regex=True)
    post = dict(byte_level, trim_offsets=False)
    if bos_post:
        bos = vocab["tokens"][0]
        post = dict(type="TemplateProcessing",
                    single=[dict(SpecialToken=dict(id=bos, type_id=0)),
                            dict(Sequence=dict(id="A", type_id=0))],
                    pair=[dict(SpecialToken=dict(id=bos, type_id=0)),
                          dict(Sequence=dict(id="A", type_id=0)),
                          dict(Sequence=dict(id="B", type_id=1))],
                    special_tokens={bos: dict(id=bos, ids=[0], tokens=[bos])})
    if qwen:
        pre = [dict(type="Split", pattern=dict(Regex=QWEN2_PATTERN), behavior="Isolated",
                    invert=False),
               dict(byte_level, trim_offsets=False, use_regex=False)]
    elif gpt2:
        pre = [byte_level]
    else:
        pre = [dict(type="Digits", individual_digits=True), byte_level]
    return dict(
        version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
        pre_tokenizer=dict(type="Sequence", pretokenizers=pre),
        post_processor=post,
        decoder=dict(type="ByteLevel", add_prefix_space=True, trim_offsets=True, use_regex=True),
        model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                   end_of_word_suffix=None, fuse_unk=False, byte_fallback=False,
                   ignore_merges=False,
                   vocab={t: i for i, t in enumerate(vocab["tokens"])},
                   merges=[m.split(" ", 1) for m in vocab["merges"]]))


def to_bytes(a, dtype):
    a = np.ascontiguousarray(a, dtype=np.float32)
    if dtype == "F32":
        return a.astype("<f4").tobytes()
    if dtype == "F16":
        return a.astype("<f2").tobytes()
    bits = a.view(np.uint32).astype(np.uint64)
    rounded = (bits + np.uint64(0x7FFF) + ((bits >> np.uint64(16)) & np.uint64(1))) >> np.uint64(16)
    return rounded.astype("<u2").tobytes()


def write_safetensors(path, tensors, dtype):
    header, blobs, offset = {}, [], 0
    for name in sorted(tensors):
        data = to_bytes(tensors[name], dtype)
        header[name] = dict(dtype=dtype, shape=list(tensors[name].shape),
                            data_offsets=[offset, offset + len(data)])
        blobs.append(data)
        offset += len(data)
    header["__metadata__"] = dict(format="pt")
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for b in blobs:
            f.write(b)


def gpt2_weights(spec, vocab_size):
    """GPT-2's tensors as transformers names and stores them: Conv1D
    matrices as [in, out]."""
    h, L, ffn = spec["hidden"], spec["layers"], spec["ffn"]
    t = {"transformer.wte.weight": splitmix("transformer.wte.weight",
                                            vocab_size * h).reshape(vocab_size, h),
         "transformer.wpe.weight": splitmix("transformer.wpe.weight", 512 * h).reshape(512, h)
         * np.float32(0.3)}
    for n in ["ln_f"]:
        t[f"transformer.{n}.weight"] = around_one(f"transformer.{n}.weight", h, 0.2)
        t[f"transformer.{n}.bias"] = splitmix(f"transformer.{n}.bias", h) * np.float32(0.1)
    for i in range(L):
        p = f"transformer.h.{i}."
        for n in ["ln_1", "ln_2"]:
            t[p + n + ".weight"] = around_one(p + n + ".weight", h, 0.2)
            t[p + n + ".bias"] = splitmix(p + n + ".bias", h) * np.float32(0.1)
        for n, cin, cout in [("attn.c_attn", h, 3 * h), ("attn.c_proj", h, h),
                             ("mlp.c_fc", h, ffn), ("mlp.c_proj", ffn, h)]:
            t[p + n + ".weight"] = matrix(p + n + ".weight", cout, cin).T.copy()
            t[p + n + ".bias"] = splitmix(p + n + ".bias", cout) * np.float32(0.1)
    return t


def weights(spec, vocab_size):
    if spec["model_type"] == "gpt2":
        return gpt2_weights(spec, vocab_size)
    h, hd, L = spec["hidden"], spec["head_dim"], spec["layers"]
    nh, nkv, ffn = spec["heads"], spec["kv"], spec["ffn"]
    t = {"model.embed_tokens.weight": splitmix("model.embed_tokens.weight",
                                               vocab_size * h).reshape(vocab_size, h),
         "model.norm.weight": around_one("model.norm.weight", h, 0.2)}
    if not spec["tied"]:
        t["lm_head.weight"] = matrix("lm_head.weight", vocab_size, h, gain=3.0)
    gemma = spec.get("gemma", False)
    if gemma:
        # Gemma multiplies the embeddings by √hidden: stored that much smaller.
        t["model.embed_tokens.weight"] *= np.float32(1.0 / np.sqrt(h))
    # Gemma's norms multiply by 1 + w: stored around 0.
    norm = (lambda name, n, spread: splitmix(name, n) * np.float32(spread)) if gemma else around_one
    t["model.norm.weight"] = norm("model.norm.weight", h, 0.2)
    for i in range(L):
        p = f"model.layers.{i}."
        norms = ["input_layernorm", "post_attention_layernorm"]
        if gemma:
            norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
        for n in norms:
            t[p + n + ".weight"] = norm(p + n + ".weight", h, 0.2)
        if spec.get("fused"):
            t[p + "self_attn.qkv_proj.weight"] = matrix(p + "self_attn.qkv_proj.weight",
                                                        (nh + 2 * nkv) * hd, h)
            t[p + "mlp.gate_up_proj.weight"] = matrix(p + "mlp.gate_up_proj.weight", 2 * ffn, h)
        else:
            for proj, rows in [("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)]:
                name = p + f"self_attn.{proj}_proj.weight"
                t[name] = matrix(name, rows, h)
                if spec.get("bias"):
                    bname = p + f"self_attn.{proj}_proj.bias"
                    t[bname] = splitmix(bname, rows) * np.float32(0.5)
            t[p + "mlp.gate_proj.weight"] = matrix(p + "mlp.gate_proj.weight", ffn, h)
            t[p + "mlp.up_proj.weight"] = matrix(p + "mlp.up_proj.weight", ffn, h)
        if spec.get("qk_norm"):
            for n in ["q_norm", "k_norm"]:
                t[p + f"self_attn.{n}.weight"] = norm(p + f"self_attn.{n}.weight", hd, 0.2)
        t[p + "self_attn.o_proj.weight"] = matrix(p + "self_attn.o_proj.weight", h, nh * hd)
        t[p + "mlp.down_proj.weight"] = matrix(p + "mlp.down_proj.weight", h, ffn)
    return t


def config(spec, vocab_size):
    if spec["model_type"] == "gpt2":
        return dict(architectures=[spec["arch"]], model_type="gpt2", n_embd=spec["hidden"],
                    n_layer=spec["layers"], n_head=spec["heads"], n_positions=512,
                    n_inner=spec["ffn"], vocab_size=vocab_size, layer_norm_epsilon=1e-5,
                    activation_function="gelu_new", bos_token_id=0, eos_token_id=2,
                    torch_dtype="float16")
    c = dict(architectures=[spec["arch"]], model_type=spec["model_type"],
             hidden_size=spec["hidden"], intermediate_size=spec["ffn"],
             num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
             num_key_value_heads=spec["kv"], vocab_size=vocab_size,
             max_position_embeddings=4096, rms_norm_eps=1e-6, hidden_act="silu",
             rope_theta=spec.get("rope_base", 10_000.0), tie_word_embeddings=spec["tied"],
             bos_token_id=0, eos_token_id=2,
             torch_dtype={"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[spec["dtype"]])
    if spec["hidden"] // spec["heads"] != spec["head_dim"] or spec["model_type"] == "qwen3":
        c["head_dim"] = spec["head_dim"]
    if spec.get("llama3"):
        c["max_position_embeddings"] = 16384
        c["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=8192)
    if spec["model_type"] == "phi3":
        c["original_max_position_embeddings"] = 4096
        c["pad_token_id"] = 0
    if spec["model_type"] in ("llama",):
        c["attention_bias"] = False
        c["mlp_bias"] = False
    if spec["model_type"] == "gemma2":
        c.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=24,
                 sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=10.0,
                 max_position_embeddings=512, attention_bias=False)
        del c["hidden_act"]
    if spec["model_type"] == "gemma3_text":
        layer_types = ["sliding_attention"] * 5 + ["full_attention"] + ["sliding_attention"]
        c.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=32,
                 sliding_window=6, rope_local_base_freq=10_000.0,
                 rope_scaling=dict(rope_type="linear", factor=8.0), layer_types=layer_types,
                 attn_logit_softcapping=None, final_logit_softcapping=None,
                 max_position_embeddings=512, attention_bias=False)
        del c["hidden_act"]
    return c


def write(name, spec, vocab, out_dir):
    d = os.path.join(out_dir, name)
    os.makedirs(d, exist_ok=True)
    vocab_size = len(vocab["tokens"])
    qwen = spec["model_type"].startswith("qwen")
    t = weights(spec, vocab_size)
    shards = spec.get("shards", 1)
    for f in os.listdir(d):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(d, f))
    if shards == 1:
        write_safetensors(os.path.join(d, "model.safetensors"), t, spec["dtype"])
    else:
        names = sorted(t)
        weight_map = {}
        for s in range(shards):
            file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: t[n] for n in names[s::shards]}
            write_safetensors(os.path.join(d, file), part, spec["dtype"])
            weight_map.update({n: file for n in part})
        total = sum(len(to_bytes(a, spec["dtype"])) for a in t.values())
        with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
            json.dump(dict(metadata=dict(total_size=total), weight_map=weight_map), f, indent=2)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config(spec, vocab_size), f, indent=2)
    with open(os.path.join(d, "generation_config.json"), "w") as f:
        json.dump(dict(bos_token_id=0, eos_token_id=[2, 0]), f, indent=2)
    with open(os.path.join(d, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(vocab, spec.get("bos_post", False), qwen,
                                 spec["model_type"] == "gpt2"), f, ensure_ascii=False)
    tok_class = {"qwen2": "Qwen2Tokenizer", "qwen3": "Qwen2Tokenizer",
                 "gpt2": "GPT2Tokenizer"}.get(spec["model_type"], "PreTrainedTokenizerFast")
    tok_config = dict(tokenizer_class=tok_class, model_max_length=4096,
                      eos_token=vocab["tokens"][2], unk_token=vocab["tokens"][0],
                      bos_token=vocab["tokens"][0 if spec.get("bos_post") else 1],
                      chat_template=vocab["template"])
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    return d


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    reference, out_dir = sys.argv[1], sys.argv[2]
    os.makedirs(out_dir, exist_ok=True)
    vocab = read_vocab(reference)
    for name, spec in MODELS.items():
        print(write(name, spec, vocab, out_dir))


if __name__ == "__main__":
    main()
