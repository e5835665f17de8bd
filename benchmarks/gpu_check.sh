#!/usr/bin/env bash
# The GPU check, ready for a lent GPU machine (<= 8 minutes on one H200):
#   1. the device-parametrised tests on CUDA (tests/test_devices.py: tiny models of two architectures
#      give the CPU's graphs to 1e-4 in float32, the same interventions and training steps);
#   2. attribution time and peak GPU memory of a random-weight model of Gemma 2 2B's shape with random
#      JumpReLU transcoders (16,384 features a layer, about 20 active a token) at 64, 512 and 2048
#      tokens, float32 and bfloat16 (benchmarks/gpu_attribution.py).
# Results go to $OUT (default benchmarks/results): gpu_tests.log, gpu_tests.xml, gpu_attribution.json.
# It runs under the machine's own python3 with its PyTorch (mechscope from src/, no install): the
# device tool's machines have torch, transformers, safetensors, jaxtyping, click, pyyaml and pytest.
# Move the set packages (sets/) out of the working tree for the call: the tool sends at most 64 MiB.
#   device run: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MECHSCOPE_HOME=${MECHSCOPE_HOME:-/tmp/mechscope-home}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/gpu_env.txt"
status=0
timeout 180 $PY -m pytest -q -p no:cacheprovider tests/test_devices.py --junitxml="$OUT/gpu_tests.xml" 2>&1 | tee "$OUT/gpu_tests.log" || status=1
timeout 270 $PY benchmarks/gpu_attribution.py --device cuda --out "$OUT/gpu_attribution.json" 2>&1 | tee "$OUT/gpu_attribution.log" || status=1
exit $status
