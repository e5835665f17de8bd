#!/usr/bin/env bash
# The peer for benchmarks/vs_sparsify.py, in its own virtualenv (benchmarks/.venv-sparsify,
# git-ignored): EleutherAI's sparsify (PyPI eai-sparsify, import name sparsify), pinned.
# torch goes in first as the CPU wheel so nothing pulls a CUDA build. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
SPARSIFY_VERSION=${SPARSIFY_VERSION:-1.3.3}
if [ ! -x .venv-sparsify/bin/python ]; then
    "$PYTHON" -m venv .venv-sparsify
fi
if ! .venv-sparsify/bin/python -c "import torch" 2>/dev/null; then
    .venv-sparsify/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv-sparsify/bin/pip install --quiet --disable-pip-version-check "eai-sparsify==${SPARSIFY_VERSION}"
.venv-sparsify/bin/python - <<'EOF'
from importlib.metadata import version

import sparsify
import torch

print("eai-sparsify", version("eai-sparsify"), sparsify.__file__, "torch", torch.__version__)
EOF
