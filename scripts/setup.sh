#!/usr/bin/env bash
# One-step set-up: a virtualenv in .venv with the CPU build of torch and mechscope (editable, with
# test, server and chat-model extras; the shipped transcoder sets from sets/; as root on Debian, chromium for the browser test). Safe to run again; it only
# installs what is missing.
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
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev,server,chat]"
# the shipped transcoder sets: one distribution each under sets/ (editable: the weights stay in the checkout)
for set_dir in sets/*/; do
    .venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e "$set_dir"
done
# Debian's chromium for the graph explorer's browser test (Playwright drives it; it downloads no browser)
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
fi
