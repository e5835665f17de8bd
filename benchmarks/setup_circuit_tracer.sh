#!/usr/bin/env bash
# The reference implementation for benchmarks/vs_circuit_tracer.py, in its own virtualenv
# (benchmarks/.venv-ct, git-ignored): circuit-tracer 0.5.0 pins older transformers than mechscope.
# torch goes in first as the CPU wheel so nothing pulls a CUDA build; nnsight 0.6.1 because 0.8.1
# breaks circuit-tracer's import. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv-ct/bin/python ]; then
    "$PYTHON" -m venv .venv-ct
fi
if ! .venv-ct/bin/python -c "import torch" 2>/dev/null; then
    .venv-ct/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
fi
.venv-ct/bin/pip install --quiet --disable-pip-version-check "circuit-tracer==0.5.0" "nnsight==0.6.1" "psutil"
.venv-ct/bin/python -c "import circuit_tracer, torch; print('circuit-tracer', circuit_tracer.__file__, 'torch', torch.__version__)"
