#!/usr/bin/env bash
# The recipe of the shipped set qwen2.5-coder-0.5b-instruct-plt-v1, every step resumable: run it again
# after an interruption and it goes on where it stopped (corpus sources are fetched once, chat
# transcripts are written per batch, training checkpoints every five minutes).
#   1. the offline corpus (8 sources);
#   2. chat transcripts (weight 0.3): offline user turns, the model's own replies sampled. Transcripts
#      already in the corpus chat-<model> are kept: v1's are 3,200 conversations with replies of up to 64
#      tokens sampled on an H200 (scripts/train_qwen_set_gpu.sh); without a GPU this samples 2,400
#      conversations of up to 48 tokens on the CPU (about an hour on 2 cores with AVX512-BF16);
#   3. 24 layers x 896 JumpReLU features with skip, TopK k=60 on 3.0M tokens; calibration on 512
#      sequences, a least-squares refit of decoders and skips on 256, held-out figures on 256 sequences
#      each of corpus text and chat transcripts, all on the float32 model.
# Time on 2 cores of an AMD EPYC (Zen 4, AVX512-BF16) measured 2026-12-07: transcripts 41 conversations a
# minute; training 5.5 s of bfloat16 forward and 3.8 s of transcoder steps per 2,032 tokens, so about
# 4 hours for 3.0M tokens: it spans sessions on the CPU (each resumes exactly); on a GPU it is minutes.
# The model forward runs in bfloat16 where the CPU computes it natively (AMX or AVX512-BF16: 3.4x faster
# than float32 on such a machine) and in float32 elsewhere (bfloat16 is emulated there: 3.6x slower,
# measured on an AVX-512 machine without BF16). A resumed training run keeps the precision it started with.
# It runs at the lowest priority (nice 19) on OMP_NUM_THREADS threads (default 2) so the machine stays usable.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
MS=".venv/bin/mechscope"
MODEL=qwen2.5-coder-0.5b-instruct
NAME=qwen2.5-coder-0.5b-instruct-plt-v1
home=${MECHSCOPE_HOME:-$HOME/.cache/mechscope}
state="$home/training/$NAME/checkpoint/state.json"
source scripts/precision.sh  # bfloat16 where the CPU computes it natively; a resumed run keeps its own
DTYPE=$(training_dtype "$state" model_dtype)
echo "model forward in $DTYPE"
[ -f "$home/corpus/default/manifest.json" ] || nice -n 19 $MS corpus build
if ! grep -q '"name": "chat"' "$home/corpus/chat-$MODEL/manifest.json" 2>/dev/null; then
    nice -n 19 $MS corpus chat --model "$MODEL" --conversations 2400 --max-new-tokens 48 --weight 0.3 \
        --model-dtype "$DTYPE" --no-progress
fi
nice -n 19 $MS -v train --model "$MODEL" --corpus "chat-$MODEL" --name "$NAME" --d-transcoder 896 --k 60 \
    --n-tokens 3000000 --model-dtype "$DTYPE" --calibration-sequences 512 --refit-sequences 256 \
    --eval-sequences 256 --no-progress
