#!/usr/bin/env bash
# The recipe of the cross-layer transcoder gemma-3-270m-clt-v1, resumable: run it again after an
# interruption and it goes on where it stopped (the corpus is fetched once; training checkpoints
# every five minutes).
#   1. the offline corpus (8 sources);
#   2. one CLT for all 18 layers: 448 features a layer with a skip connection (123.7 MB in bfloat16,
#      under the 125 MB budget: encoders 18 x 448 x 640, decoders 171 blocks of 448 x 640, skips
#      18 x 640 x 640), trained by the JumpReLU + tanh objective of "Circuit Tracing" (--method
#      jumprelu, sparsity weight 5e-4 ramped from 0) on 3.05M tokens of the model's bfloat16 forward;
#      held-out figures on 512 sequences of the float32 model.
# Why JumpReLU + tanh rather than TopK with calibration: README, "How the CLT recipe was chosen".
# Time on 2 cores of an AMD EPYC (Zen 4, AVX512-BF16), measured 2026-12-07 with bfloat16 model forward
# and decoder products (--decoder-dtype): about 2.1 s per 1,000 tokens, so about 1.8 hours (3.6 s per
# 1,000 tokens with float32 decoder products); it runs at low priority (nice 10) so the machine stays usable.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MS=".venv/bin/mechscope"
home=${MECHSCOPE_HOME:-$HOME/.cache/mechscope}
state="$home/training/gemma-3-270m-clt-v1/checkpoint/state.json"
# bfloat16 model forward and decoder products where the CPU computes bfloat16 natively, float32
# elsewhere; a resumed run keeps what it started with (scripts/precision.sh)
source scripts/precision.sh
MODEL_DTYPE=$(training_dtype "$state" model_dtype)
DECODER_DTYPE=$(training_dtype "$state" decoder_dtype)
echo "model forward in $MODEL_DTYPE, decoder products in $DECODER_DTYPE"
[ -f "$home/corpus/default/manifest.json" ] || nice -n 10 $MS corpus build
nice -n 10 $MS -v train --kind clt --method jumprelu --sparsity-coef 5e-4 --model gemma-3-270m \
    --name gemma-3-270m-clt-v1 --d-transcoder 448 --n-tokens 3050000 --model-dtype "$MODEL_DTYPE" \
    --decoder-dtype "$DECODER_DTYPE" --eval-sequences 512 --no-progress
