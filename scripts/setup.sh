#!/usr/bin/env bash
# One-step set-up: a virtualenv in .venv with the CPU build of torch and mechscope (editable, with
# test extras). Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# the CPU wheel first, so nothing below can pull a CUDA build of torch
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev]"
