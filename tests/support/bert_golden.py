#!/usr/bin/env python3
"""Computes tests/golden/embeddings.json: HF transformers' embeddings of the
random-weight BERT that tests/support/bert_models.py writes. Run once, by
hand, when the model or the texts change; CI only reads the JSON.

    python3 -m venv ENV && ENV/bin/python -m pip install numpy torch transformers gguf==0.19.0
    ENV/bin/python bert_models.py - MODELS_DIR
    ENV/bin/python hf_models.py REFERENCE.gguf HF_DIR
    ENV/bin/python bert_golden.py MODELS_DIR OUT.json HF_DIR

The directory is loaded with BertModel in float32 with eager attention and
its tokenizer.json with PreTrainedTokenizerFast. Each text is run alone (no
padding) and its last hidden state pooled two ways: the mean over its tokens
then L2-normalized (what the directory's sentence-transformers modules say),
and the [CLS] row as it is. The token ids are recorded too, and the SHA-256
of every file, so a test knows it reads the files these outputs came from.

Decoder models pooled (HF_DIR: the tiny directories of hf_models.py): for
llama-f16 and qwen2-bf16, AutoModel's last hidden state (after the final
norm) of each text, its last row and its mean, each L2-normalized, with the
token ids (the tokenizer's special tokens added).
"""

import json
import os
import sys

import torch
import transformers
from transformers import AutoModel, BertModel, PreTrainedTokenizerFast

from hf_golden import sha256

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hello world",
    "What is the capital of France? Paris is the capital city of France!",
    "Embedding vectors make search by sentence easy; queries find answers.",
    "Naïve café 東京 42",
    "a",
]


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    models, out, hf_dir = sys.argv[1], sys.argv[2], sys.argv[3]
    d = os.path.join(models, "bert-f32")
    files = {}
    for root, _, names in os.walk(d):
        for n in sorted(names):
            p = os.path.join(root, n)
            files[os.path.relpath(p, d)] = sha256(p)
    files_gguf = {"bert-f32.gguf": sha256(os.path.join(models, "bert-f32.gguf"))}
    model = BertModel.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
    cases = []
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
        mean = h.mean(dim=0)
        mean = mean / mean.norm()
        cases.append(dict(text=text, ids=ids, mean_normalized=mean.tolist(),
                          cls=h[0].tolist()))
    decoders = {}
    for name in ["llama-f16", "qwen2-bf16"]:
        d = os.path.join(hf_dir, name)
        model = AutoModel.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
        model.eval()
        tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(d, "tokenizer.json"))
        rows = []
        for text in TEXTS[:4]:
            ids = tok(text)["input_ids"]
            with torch.no_grad():
                h = model(input_ids=torch.tensor([ids])).last_hidden_state[0].double()
            last, mean = h[-1], h.mean(dim=0)
            rows.append(dict(text=text, ids=ids, last=(last / last.norm()).tolist(),
                             mean=(mean / mean.norm()).tolist()))
        decoders[name] = dict(model_safetensors=sha256(os.path.join(d, "model.safetensors"))
                              if os.path.exists(os.path.join(d, "model.safetensors")) else None,
                              cases=rows)
    golden = dict(transformers=transformers.__version__, torch=torch.__version__,
                  files=files, gguf=files_gguf, cases=cases, decoders=decoders)
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
