#!/usr/bin/env python3
"""Computes tests/golden/families.json: llama.cpp's outputs on the tiny
models of each family (tests/support/family_models.py). Run once, by hand,
when the models or prompts change; CI only reads the JSON.

    shared/bench/llamacpp-anchor.sh            # builds llama.cpp (libllama too)
    family_golden.py MODELS_DIR OUT.json
    ONLY=phi3-long,phi3-short family_golden.py MODELS_DIR OUT.json
                    # recomputes those models only, keeping OUT's others

It drives llama.cpp through the Python bindings that ship in the same
llama-cpp-python sources the anchor script builds (ANCHOR_DIR, default
~/.cache/parallm-anchors; version LLAMA_CPP_PYTHON_VERSION, default 0.3.36),
over the shared library the anchor build made, so no second build of
llama.cpp is needed. The bindings import numpy, jinja2, diskcache and
typing_extensions: run it with an interpreter that has them.

llama.cpp runs with an f32 KV cache and without flash attention. For each
model and prompt: llama.cpp's tokens (BOS and EOS as the vocabulary asks,
special tokens parsed), the argmax at every position, the top 10 logits at the last, and 16
greedy tokens with llama.cpp's top-2 logit gap at each (where quantized
weights may part at a near-tie) (EOS not special: the weights are random).
"""

import glob
import hashlib
import json
import os
import re
import sys

VERSION = os.environ.get("LLAMA_CPP_PYTHON_VERSION", "0.3.36")
ANCHOR = os.environ.get("ANCHOR_DIR", os.path.expanduser("~/.cache/parallm-anchors"))
SRC = os.path.join(ANCHOR, "src", f"llama_cpp_python-{VERSION}")
libs = sorted(glob.glob(os.path.join(ANCHOR, f"llama.cpp-{VERSION}", "build-*", "bin", "libllama.so")))
if not libs:
    sys.exit(f"no libllama.so under {ANCHOR}: run shared/bench/llamacpp-anchor.sh first")
os.environ["LLAMA_CPP_LIB_PATH"] = os.path.dirname(libs[-1])
sys.path.insert(0, SRC)

import numpy as np  # noqa: E402
from llama_cpp import Llama  # noqa: E402
from golden_prompts import GREEDY, PROMPTS  # noqa: E402

MODELS = ["llama-r3", "llama-lin", "qwen2", "qwen3", "phi3", "llama-spm", "gemma2", "gemma3",
          "gpt2", "qwen2-yarn", "phi3-q8_0", "qwen2-q4_0", "gemma3-q8_0", "gpt2-q8_0",
          "llama-r3-f16", "qwen2-bf16", "llama-tekken", "phi3-long", "phi3-short",
          "phi3-spm", "llama-gpt4o"]


def run(path):
    # An f32 KV cache (llama.cpp's default is f16) and no flash attention:
    # the reference computes in f32 throughout, as parallm does with f32
    # weights, so only summation order separates them.
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=2, logits_all=True,
                type_k=0, type_v=0, flash_attn=False, verbose=False)
    cases = []
    for text in PROMPTS:
        # add_bos here means "add the special tokens the vocabulary asks
        # for" (llama_tokenize's add_special): BOS for the SentencePiece model.
        toks = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
        llm.reset()
        llm.eval(toks)
        scores = np.array(llm.scores[: len(toks)], dtype=np.float32)
        last = scores[-1]
        top = np.argsort(-last, kind="stable")[:10]
        greedy, gaps = [], []
        for i in range(GREEDY):
            row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
            t = int(np.argmax(row))
            top2 = np.sort(row)[-2:]
            greedy.append(t)
            gaps.append(round(float(top2[1] - top2[0]), 5))
            if i + 1 < GREEDY:
                llm.eval([t])
        cases.append({
            "prompt": text,
            "tokens": [int(t) for t in toks],
            "argmax": [int(a) for a in scores.argmax(axis=1)],
            "top10": [[int(t), round(float(last[t]), 5)] for t in top],
            "greedy": greedy,
            "greedy_gaps": gaps,
        })
    return cases


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    models_dir, out = sys.argv[1], sys.argv[2]
    result = {
        "about": "llama.cpp (llama-cpp-python " + VERSION + " sources, CPU, 2 threads, f32 KV cache) on the tiny "
                 "models of tests/support/family_models.py; made by tests/support/family_golden.py",
        "models": {},
    }
    only = [n for n in os.environ.get("ONLY", "").split(",") if n]
    if only:
        with open(out) as f:
            kept = json.load(f)["models"]
    for name in MODELS:
        if only and name not in only:
            result["models"][name] = kept[name]
            continue
        path = os.path.join(models_dir, f"{name}.gguf")
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        result["models"][name] = {"sha256": digest, "cases": run(path)}
        print(name, "done", file=sys.stderr)
    text = json.dumps(result, indent=1, ensure_ascii=False)
    # Arrays of numbers on one line each.
    text = re.sub(r"\[[-0-9.,\s]*\]", lambda m: re.sub(r"\s+", "", m.group(0)).replace(",", ", "), text)
    with open(out, "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
