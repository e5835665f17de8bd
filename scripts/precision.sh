# Sourced by the CPU training recipes (scripts/train_gemma_clt.sh, scripts/train_qwen_set.sh).
#   training_dtype STATE KEY: the precision a resumable run uses for KEY (model_dtype, decoder_dtype):
#     what its checkpoint STATE (state.json) recorded when one exists (a resumed run keeps what it
#     started with; float32 where the checkpoint predates KEY), else bfloat16 where the CPU computes
#     bfloat16 natively (AMX or AVX512-BF16 in /proc/cpuinfo) and float32 elsewhere (emulated bfloat16
#     is 3.6x slower than float32, measured on an AVX-512 CPU without BF16).
training_dtype() {
    local state=$1 key=$2
    if [ -f "$state" ]; then
        .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['config'].get(sys.argv[2], 'float32'))" "$state" "$key"
    elif grep -qwE 'amx_bf16|avx512_bf16' /proc/cpuinfo; then echo bfloat16
    else echo float32; fi
}
