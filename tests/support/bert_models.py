#!/usr/bin/env python3
"""Writes the random-weight BERT encoders the embedding tests and benchmarks
use, as a Hugging Face directory and as the GGUF file llama.cpp's converter
would write from it.

    bert_models.py IGNORED OUT_DIR          # the tiny test model (tests/embeddings.rs)
    bert_models.py --bench OUT.gguf         # a MiniLM-L6-sized one (benches/embeddings.sh)

The tiny model, `OUT_DIR/bert-f32/` and `OUT_DIR/bert-f32.gguf`:
  BertModel (2 layers, hidden 64, 4 heads, FFN 128, 64 positions, 2 token
  types), f32; a WordPiece vocabulary of 211 tokens (lowercased, `##`
  continuations); sentence-transformers' files saying mean pooling and
  normalization (modules.json, 1_Pooling/config.json). The GGUF has
  `general.architecture = bert`, `bert.pooling_type = 1` (mean), and the
  vocabulary as llama.cpp's converter spells it (`▁` before a word's first
  piece, `##` dropped from the others).

The first argument is the reference model's path, which the test harness
passes to every model script; it is not read. Weights come from splitmix64
keyed by the tensor's Hugging Face name (family_models.py), so the bytes are
the same on every machine; tests/golden/embeddings.json records their
SHA-256 and transformers' outputs (tests/support/bert_golden.py).
"""

import json
import os
import sys

import numpy as np
import gguf

from family_models import around_one, matrix, splitmix
from hf_models import write_safetensors

TINY = dict(layers=2, hidden=64, heads=4, ffn=128, positions=64, types=2)
# all-MiniLM-L6-v2's shape.
BENCH = dict(layers=6, hidden=384, heads=12, ffn=1536, positions=512, types=2)

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = """the a an of to and in is it that for on with as was at by be this are from or
have not but what all were when we there can your which their said if do will each about
how up out them then she many some so these would other into has more her two like him see
time could no make than first been its who now people my made over did down only way find use
may water long little very after words called just where most know quick brown fox jumps lazy
dog embed vector search model token sentence query answer paris france capital city hello world
cat sat mat""".split()
PIECES = ["ing", "ed", "er", "ly", "tion", "est", "es"]


def vocab_tiny():
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?;:'\"()-")
    tokens = SPECIAL + chars + ["##" + c for c in chars[:36]] + ["##" + p for p in PIECES]
    tokens += [w for w in WORDS if w not in tokens]
    return tokens


def vocab_bench(size=30522):
    base = vocab_tiny()
    return base + [f"[unused{i}]" for i in range(size - len(base))]


def weights(spec, vocab_size):
    h, f = spec["hidden"], spec["ffn"]
    t = {}
    t["embeddings.word_embeddings.weight"] = matrix("embeddings.word_embeddings.weight",
                                                    vocab_size, h, gain=0.5 * np.sqrt(h))
    t["embeddings.position_embeddings.weight"] = matrix("embeddings.position_embeddings.weight",
                                                        spec["positions"], h, gain=0.2 * np.sqrt(h))
    t["embeddings.token_type_embeddings.weight"] = matrix(
        "embeddings.token_type_embeddings.weight", spec["types"], h, gain=0.2 * np.sqrt(h))
    for n in ["embeddings.LayerNorm"]:
        t[n + ".weight"] = around_one(n + ".weight", h, 0.2)
        t[n + ".bias"] = splitmix(n + ".bias", h) * np.float32(0.1)
    for i in range(spec["layers"]):
        p = f"encoder.layer.{i}."
        for m, rows, cols in [("attention.self.query", h, h), ("attention.self.key", h, h),
                              ("attention.self.value", h, h), ("attention.output.dense", h, h),
                              ("intermediate.dense", f, h), ("output.dense", h, f)]:
            t[p + m + ".weight"] = matrix(p + m + ".weight", rows, cols)
            t[p + m + ".bias"] = splitmix(p + m + ".bias", rows) * np.float32(0.1)
        for n in ["attention.output.LayerNorm", "output.LayerNorm"]:
            t[p + n + ".weight"] = around_one(p + n + ".weight", h, 0.2)
            t[p + n + ".bias"] = splitmix(p + n + ".bias", h) * np.float32(0.1)
    t["pooler.dense.weight"] = matrix("pooler.dense.weight", h, h)
    t["pooler.dense.bias"] = splitmix("pooler.dense.bias", h) * np.float32(0.1)
    return t


# Hugging Face suffix after `encoder.layer.N.` → GGUF suffix after `blk.N.`.
LAYER = {
    "attention.self.query": "attn_q", "attention.self.key": "attn_k",
    "attention.self.value": "attn_v", "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm", "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down", "output.LayerNorm": "layer_output_norm",
}
MODEL = {
    "embeddings.word_embeddings": "token_embd", "embeddings.position_embeddings": "position_embd",
    "embeddings.token_type_embeddings": "token_types", "embeddings.LayerNorm": "token_embd_norm",
}


def gguf_name(hf):
    stem, kind = hf.rsplit(".", 1)
    if stem in MODEL:
        return f"{MODEL[stem]}.{kind}"
    if stem.startswith("encoder.layer."):
        n, rest = stem[len("encoder.layer."):].split(".", 1)
        return f"blk.{n}.{LAYER[rest]}.{kind}"
    return None  # the pooler: llama.cpp's converter drops it


def config(spec, vocab_size):
    return dict(architectures=["BertModel"], model_type="bert", vocab_size=vocab_size,
                hidden_size=spec["hidden"], num_hidden_layers=spec["layers"],
                num_attention_heads=spec["heads"], intermediate_size=spec["ffn"],
                hidden_act="gelu", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                max_position_embeddings=spec["positions"], type_vocab_size=spec["types"],
                initializer_range=0.02, layer_norm_eps=1e-12, pad_token_id=0,
                position_embedding_type="absolute", torch_dtype="float32")


def tokenizer_json(tokens):
    ids = {t: i for i, t in enumerate(tokens)}
    added = [dict(id=ids[t], content=t, single_word=False, lstrip=False, rstrip=False,
                  normalized=False, special=True) for t in SPECIAL]
    cls, sep = ("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])
    special = {t: dict(id=t, ids=[i], tokens=[t]) for t, i in [cls, sep]}
    return dict(
        version="1.0", truncation=None, padding=None, added_tokens=added,
        normalizer=dict(type="BertNormalizer", clean_text=True, handle_chinese_chars=True,
                        strip_accents=None, lowercase=True),
        pre_tokenizer=dict(type="BertPreTokenizer"),
        post_processor=dict(
            type="TemplateProcessing",
            single=[dict(SpecialToken=dict(id="[CLS]", type_id=0)),
                    dict(Sequence=dict(id="A", type_id=0)),
                    dict(SpecialToken=dict(id="[SEP]", type_id=0))],
            pair=[dict(SpecialToken=dict(id="[CLS]", type_id=0)),
                  dict(Sequence=dict(id="A", type_id=0)),
                  dict(SpecialToken=dict(id="[SEP]", type_id=0)),
                  dict(Sequence=dict(id="B", type_id=1)),
                  dict(SpecialToken=dict(id="[SEP]", type_id=1))],
            special_tokens=special),
        decoder=dict(type="WordPiece", prefix="##", cleanup=True),
        model=dict(type="WordPiece", unk_token="[UNK]", continuing_subword_prefix="##",
                   max_input_chars_per_word=100, vocab=ids))


def write_hf(d, spec, tokens):
    os.makedirs(os.path.join(d, "1_Pooling"), exist_ok=True)
    write_safetensors(os.path.join(d, "model.safetensors"), weights(spec, len(tokens)), "F32")
    files = {
        "config.json": config(spec, len(tokens)),
        "tokenizer.json": tokenizer_json(tokens),
        "tokenizer_config.json": dict(tokenizer_class="BertTokenizerFast", do_lower_case=True,
                                      model_max_length=spec["positions"], cls_token="[CLS]",
                                      sep_token="[SEP]", pad_token="[PAD]", unk_token="[UNK]",
                                      mask_token="[MASK]"),
        "modules.json": [
            dict(idx=0, name="0", path="", type="sentence_transformers.models.Transformer"),
            dict(idx=1, name="1", path="1_Pooling", type="sentence_transformers.models.Pooling"),
            dict(idx=2, name="2", path="2_Normalize",
                 type="sentence_transformers.models.Normalize")],
        "1_Pooling/config.json": dict(word_embedding_dimension=spec["hidden"],
                                      pooling_mode_cls_token=False,
                                      pooling_mode_mean_tokens=True,
                                      pooling_mode_max_tokens=False),
    }
    for name, value in files.items():
        with open(os.path.join(d, name), "w") as f:
            json.dump(value, f, indent=2)
    with open(os.path.join(d, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")


def phantom(tok):
    """llama.cpp's spelling of a WordPiece token."""
    if tok.startswith("[") and tok.endswith("]"):
        return tok
    if tok.startswith("##"):
        return tok[2:]
    return "\u2581" + tok


def write_gguf(path, spec, tokens, dtype=np.float32):
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, "bert")
    w.add_name("random-bert")
    w.add_context_length(spec["positions"])
    w.add_embedding_length(spec["hidden"])
    w.add_feed_forward_length(spec["ffn"])
    w.add_block_count(spec["layers"])
    w.add_head_count(spec["heads"])
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(0 if dtype == np.float32 else 1)
    w.add_tokenizer_model("bert")
    w.add_token_list([phantom(t) for t in tokens])
    w.add_token_types([gguf.TokenType.CONTROL if t.startswith("[") and t.endswith("]")
                       else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_type_count(spec["types"])
    ids = {t: i for i, t in enumerate(tokens)}
    w.add_unk_token_id(ids["[UNK]"])
    w.add_sep_token_id(ids["[SEP]"])
    w.add_pad_token_id(ids["[PAD]"])
    w.add_mask_token_id(ids["[MASK]"])
    # As the converter writes a WordPiece vocabulary now: CLS is BOS, SEP is EOS too.
    w.add_bos_token_id(ids["[CLS]"])
    w.add_eos_token_id(ids["[SEP]"])
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)
    w.add_add_eos_token(False)
    for hf, data in sorted(weights(spec, len(tokens)).items()):
        name = gguf_name(hf)
        if name is None:
            continue
        # Matrices in the file's type; vectors, norms and the position and
        # token-type embeddings in f32, as the converter keeps them.
        wide = data.ndim == 1 or name.startswith(("position_embd", "token_types"))
        w.add_tensor(name, data.astype(np.float32) if wide else data.astype(dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--bench":
        write_gguf(sys.argv[2], BENCH, vocab_bench(), dtype=np.float16)
        print(sys.argv[2])
        return
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    out_dir = sys.argv[2]
    tokens = vocab_tiny()
    d = os.path.join(out_dir, "bert-f32")
    write_hf(d, TINY, tokens)
    write_gguf(os.path.join(out_dir, "bert-f32.gguf"), TINY, tokens)
    print(d)


if __name__ == "__main__":
    main()
