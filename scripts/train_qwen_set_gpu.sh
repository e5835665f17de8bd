#!/usr/bin/env bash
# The recipe of the shipped set qwen2.5-coder-0.5b-instruct-plt-v1 on one CUDA GPU. v1's chat transcripts
# were sampled this way on an H200 (step 2: 100 s there); its training ran on the CPU
# (scripts/train_qwen_set.sh, which keeps transcripts already in place). On the H200 step 3 ran at 11
# steps/s (about 9 minutes for the 5,908 steps, float32 forward).
#   1. the offline corpus (8 sources), unless built;
#   2. 3,200 chat transcripts: offline user turns (mined, templated, multi-turn), the model's own replies
#      (up to 64 tokens) sampled on the GPU in float32 at temperature 1, 320 conversations a batch;
#      weight 0.3 of the training sequences;
#   3. 24 layers x 896 JumpReLU features with skip, TopK k=56 (+ AuxK, resampling) on 3.0M tokens of the
#      float32 model, then JumpReLU calibration and held-out figures (corpus text and chat transcripts
#      separately); a checkpoint every 90 s, so a run stopped early resumes where it stopped.
# MS names the mechscope command (default .venv/bin/mechscope; `python3 -m mechscope` where it is not
# installed); DEVICE the GPU (default cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
MS=${MS:-.venv/bin/mechscope}
DEVICE=${DEVICE:-cuda}
MODEL=qwen2.5-coder-0.5b-instruct
NAME=qwen2.5-coder-0.5b-instruct-plt-v1
home=${MECHSCOPE_HOME:-$HOME/.cache/mechscope}
[ -f "$home/corpus/default/manifest.json" ] || $MS corpus build
echo "$(date +%T) chat transcripts"
$MS corpus chat --model "$MODEL" --conversations 3200 --max-new-tokens 64 --batch-size 320 --weight 0.3 \
    --model-dtype float32 --device "$DEVICE" --no-progress
echo "$(date +%T) training"
$MS -v train --model "$MODEL" --corpus "chat-$MODEL" --name "$NAME" --d-transcoder 896 --k 56 \
    --n-tokens 3000000 --model-dtype float32 --device "$DEVICE" --checkpoint-every-s 90 --no-progress
echo "$(date +%T) done"
