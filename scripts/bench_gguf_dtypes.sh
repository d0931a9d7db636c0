#!/usr/bin/env bash
# A GGUF loaded in bfloat16: from an empty cache (dequantized) against a cache that holds only its
# float32 entry (that entry rounded), and once the bfloat16 entry is cached; whole `sw detect`
# commands, 3 alternating rounds, and whether the two bfloat16 entries' weights are byte-identical.
#   bash scripts/bench_gguf_dtypes.sh        (after one float32 load of smollm2-135m into $SUPERWEIGHT_CACHE)
set -euo pipefail
cd "$(dirname "$0")/.."
S=$PWD/.venv/bin/sw
CACHE=${SUPERWEIGHT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/superweight}
F32=$(ls -d "$CACHE"/gguf/*-float32 | head -1)   # SmolLM2's, the only GGUF the default setup loads
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
# seconds of one `sw detect --dtype bfloat16` with the cache $WORK/$1
run() { { /usr/bin/time -f %e env SUPERWEIGHT_CACHE="$WORK/$1" "$S" detect --dtype bfloat16 -q --out c.yaml --force >/dev/null; } 2>&1; }
for i in 1 2 3; do
  rm -rf a b
  mkdir -p b/gguf
  cp -al "$F32" b/gguf/ 2>/dev/null || cp -a "$F32" b/gguf/   # hard links where the file system allows
  a=$(run a); b=$(run b); c=$(run b)
  same=$(cmp -s a/gguf/*-bfloat16/model.safetensors b/gguf/*-bfloat16/model.safetensors && echo identical || echo DIFFERENT)
  ratio=$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.2f", b / a }')
  echo "round $i: empty cache (dequantize) ${a} s; float32 entry cached (round it) ${b} s (ratio $ratio); bfloat16 entry cached ${c} s; model.safetensors $same"
done
