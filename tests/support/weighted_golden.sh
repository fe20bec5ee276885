#!/usr/bin/env bash
# Makes tests/golden/weighted.json: the bytes llama.cpp's importance-weighted
# ("imatrix") quantizers write for deterministic inputs (generator documented
# in weighted_golden.c), for Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K
# and Q6_K. src/weighted.rs's tests check quantize_weighted's bytes against
# it. Run once, by hand, when the generator or the llama.cpp version changes:
#
#   tests/support/weighted_golden.sh            # writes tests/golden/weighted.json
#   tests/support/weighted_golden.sh OUT.json   # writes OUT.json instead
#
# LLAMA_CPP_DIR is llama.cpp's source tree (default
# ~/.cache/parallm-anchors/llama.cpp-0.3.36, what
# ../shared/bench/llamacpp-anchor.sh unpacks). Its ggml/src/ggml-quants.c is
# compiled from source with the flags llama.cpp's CMake build gives it
# (-O3 -DNDEBUG -std=gnu11), plus -ffp-contract=off so that no compiler
# fuses a*b+c into one rounding (x86-64 without -march has no FMA, so there
# it changes nothing); the four ggml symbols it needs beyond itself are
# stubbed in weighted_golden.c (WG_STUBS). When a build of that tree with a
# libggml-base.so exists (LLAMA_CPP_BUILD, default the first
# $LLAMA_CPP_DIR/build*/bin holding one), the same program is also linked
# against that library, the one llama-quantize uses, and the two outputs must
# be identical.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
LLAMA_CPP_DIR=${LLAMA_CPP_DIR:-$HOME/.cache/parallm-anchors/llama.cpp-0.3.36}
OUT=${1:-$root/tests/golden/weighted.json}
CC=${CC:-cc}
src="$LLAMA_CPP_DIR/ggml/src/ggml-quants.c"
[ -f "$src" ] || { echo "weighted_golden: no $src (set LLAMA_CPP_DIR)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
inc=(-I"$LLAMA_CPP_DIR/ggml/include" -I"$LLAMA_CPP_DIR/ggml/src")
flags=(-O3 -DNDEBUG -std=gnu11 -D_GNU_SOURCE -ffp-contract=off)
label="$(basename "$LLAMA_CPP_DIR"): quantize_<type>(src, dst, nrow, n_per_row, quant_weights) from ggml/src/ggml-quants.c"

"$CC" "${flags[@]}" "${inc[@]}" -c "$src" -o "$work/ggml-quants.o"
"$CC" "${flags[@]}" "${inc[@]}" -DWG_STUBS "$here/weighted_golden.c" "$work/ggml-quants.o" -lm -o "$work/from-source"
"$work/from-source" "$label" > "$work/from-source.json"

build=${LLAMA_CPP_BUILD:-}
if [ -z "$build" ]; then
  for lib in "$LLAMA_CPP_DIR"/build*/bin/libggml-base.so; do
    [ -f "$lib" ] && { build=$(dirname "$lib"); break; }
  done
fi
if [ -n "$build" ] && [ -f "$build/libggml-base.so" ]; then
  "$CC" "${flags[@]}" "${inc[@]}" "$here/weighted_golden.c" -L"$build" -lggml-base -Wl,-rpath,"$build" -lm -o "$work/from-lib"
  "$work/from-lib" "$label" > "$work/from-lib.json"
  if ! cmp -s "$work/from-source.json" "$work/from-lib.json"; then
    echo "weighted_golden: ggml-quants.c compiled here and $build/libggml-base.so disagree" >&2
    exit 1
  fi
  echo "weighted_golden: source build and $build/libggml-base.so agree" >&2
else
  echo "weighted_golden: no libggml-base.so build found; from-source output only" >&2
fi
mkdir -p "$(dirname "$OUT")"
cp "$work/from-source.json" "$OUT"
echo "weighted_golden: wrote $OUT ($(wc -c < "$OUT") bytes)" >&2
