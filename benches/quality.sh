#!/usr/bin/env bash
# quality.sh — every cheaper variant of the reference model that
# docs/quality.md reports, made by parallm itself, then measured side by
# side by `parallm bench quality` (PPL, KL divergence from the f32 base and
# top-1 agreement on the GPL-3 text; prefill and batch-1 decode speed in
# rounds over all variants), with the table, JSON and plot it writes.
#
#   benches/quality.sh [OUT_DIR]     (default target/quality)
#
# Calibration (the importance matrix, Wanda's input norms, the blocks
# ShortGPT drops) uses a different text than the evaluation:
# /usr/share/common-licenses/GFDL-1.3 against GPL-3, both from Debian's
# base-files. Needs a release build (PARALLM, default target/release/parallm)
# and the reference model (fetched by `parallm generate` on first use).
# About 5 minutes on 2 cores and 4 GB of disk.
set -euo pipefail
P="${PARALLM:-target/release/parallm}"
OUT="${1:-target/quality}"
MODEL="${PARALLM_HOME:-$HOME/.cache/parallm}/models/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT=/usr/share/common-licenses/GPL-3
CALIB=/usr/share/common-licenses/GFDL-1.3
mkdir -p "$OUT"
v="$OUT/variants"
mkdir -p "$v"
[ -f "$MODEL" ] || "$P" generate "Hello" --max-tokens 1 >/dev/null
make() { # file command...
  local f="$1"
  shift
  [ -f "$f" ] || "$@"
}
make "$v/f32.gguf" "$P" quantize "$MODEL" "$v/f32.gguf" --type f32
make "$v/imatrix.gguf" "$P" imatrix --model "$v/f32.gguf" -f "$CALIB" -o "$v/imatrix.gguf"
for t in q8_0 q6_k q5_k_m q4_k_m q4_0; do
  make "$v/$t.gguf" "$P" quantize "$v/f32.gguf" "$v/$t.gguf" --type "$t"
done
for t in q4_k_m q4_0; do
  make "$v/$t-imatrix.gguf" "$P" quantize "$v/f32.gguf" "$v/$t-imatrix.gguf" --type "$t" --imatrix "$v/imatrix.gguf"
done
make "$v/mixed.gguf" "$P" quantize "$v/f32.gguf" "$v/mixed.gguf" --type q4_0 --keep f16:token_embd,blk.0,blk.N-1
make "$v/wanda50.gguf" "$P" prune "$v/f32.gguf" "$v/wanda50.gguf" --method wanda --sparsity 0.5 --imatrix "$v/imatrix.gguf" --type q8_0
make "$v/wanda24.gguf" "$P" prune "$v/f32.gguf" "$v/wanda24.gguf" --method wanda --pattern 2:4 --imatrix "$v/imatrix.gguf" --type q8_0
make "$v/magnitude50.gguf" "$P" prune "$v/f32.gguf" "$v/magnitude50.gguf" --method magnitude --sparsity 0.5 --type q8_0
for k in 2 4 6; do
  make "$v/drop$k.gguf" "$P" prune "$v/f32.gguf" "$v/drop$k.gguf" --method layers --drop "$k" --calib "$CALIB" --type q8_0
done
"$P" bench quality --base "$v/f32.gguf" -f "$TEXT" --out "$OUT" \
  --variant "Q8_0=$v/q8_0.gguf" \
  --variant "Q6_K=$v/q6_k.gguf" \
  --variant "Q5_K_M=$v/q5_k_m.gguf" \
  --variant "Q4_K_M=$v/q4_k_m.gguf" \
  --variant "Q4_K_M + imatrix=$v/q4_k_m-imatrix.gguf" \
  --variant "Q4_0=$v/q4_0.gguf" \
  --variant "Q4_0 + imatrix=$v/q4_0-imatrix.gguf" \
  --variant "Q4_0, f16 embd/blk.0/blk.29=$v/mixed.gguf" \
  --variant "Wanda 50% (Q8_0)=$v/wanda50.gguf" \
  --variant "Wanda 2:4 (Q8_0)=$v/wanda24.gguf" \
  --variant "magnitude 50% (Q8_0)=$v/magnitude50.gguf" \
  --variant "2 blocks dropped (Q8_0)=$v/drop2.gguf" \
  --variant "4 blocks dropped (Q8_0)=$v/drop4.gguf" \
  --variant "6 blocks dropped (Q8_0)=$v/drop6.gguf"
