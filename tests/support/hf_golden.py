#!/usr/bin/env python3
"""Computes tests/golden/hf.json: HF transformers' outputs on the tiny
Hugging Face model directories of tests/support/hf_models.py. Run once, by
hand, when the models or prompts change; CI only reads the JSON.

    python3 -m venv ENV && ENV/bin/python -m pip install numpy torch transformers gguf==0.19.0
    ENV/bin/python hf_models.py REFERENCE.gguf MODELS_DIR
    ENV/bin/python hf_golden.py MODELS_DIR OUT.json

Each model is loaded with AutoModelForCausalLM in float32 (its f16 or bf16
weights widened exactly) with eager attention, and its tokenizer.json with
PreTrainedTokenizerFast. For each prompt: the tokenizer's ids (special tokens added as
its post-processor says), the argmax at every position, the top 10 logits
at the last, and 16 greedy tokens with the top-2 logit gap at each. The
SHA-256 of every file of each directory is recorded, so a test knows it
reads the files these outputs came from.
"""

import hashlib
import json
import os
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from golden_prompts import GREEDY, PROMPTS

MODELS = ["llama-f16", "llama-bf16", "qwen2-bf16", "qwen3-f16", "phi3-f32", "gpt2-f16",
          "gemma2-bf16", "gemma3-f16"]


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@torch.no_grad()
def run(path):
    # The fast tokenizer of tokenizer.json as the file defines it (transformers
    # 5's per-model tokenizer classes may replace parts of it by their own).
    tok = PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()
    cases = []
    for prompt in PROMPTS:
        ids = tok(prompt).input_ids
        logits = model(torch.tensor([ids])).logits[0]
        argmax = logits.argmax(-1).tolist()
        last = logits[-1]
        top = torch.topk(last, 10)
        seq, greedy, gaps = list(ids), [], []
        for _ in range(GREEDY):
            row = model(torch.tensor([seq])).logits[0, -1]
            two = torch.topk(row, 2)
            greedy.append(int(two.indices[0]))
            gaps.append(float(two.values[0] - two.values[1]))
            seq.append(greedy[-1])
        cases.append(dict(prompt=prompt, tokens=ids, argmax=argmax,
                          top10=[[int(i), float(v)] for i, v in zip(top.indices, top.values)],
                          greedy=greedy, greedy_gaps=gaps))
    files = {f: sha256(os.path.join(path, f)) for f in sorted(os.listdir(path))}
    return dict(files=files, cases=cases)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models_dir, out = sys.argv[1], sys.argv[2]
    torch.set_num_threads(2)
    golden = dict(transformers=transformers.__version__, torch=torch.__version__,
                  models={m: run(os.path.join(models_dir, m)) for m in MODELS})
    with open(out, "w") as f:
        json.dump(golden, f, indent=1, ensure_ascii=False)
        f.write("\n")


if __name__ == "__main__":
    main()
