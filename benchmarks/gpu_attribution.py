"""Attribution time and peak memory of a random-weight model of Gemma 2 2B's shape with random JumpReLU
transcoders, at several prompt lengths and dtypes (issue: GPUs and torch.distributed, item 5).

The model is ``Gemma2ForCausalLM`` with Gemma 2 2B's configuration (26 layers, d_model 2304, 8 heads of
256, 4 KV heads, d_mlp 9216, vocabulary 256,000) and random weights; each layer gets a random JumpReLU
transcoder of ``--d-transcoder`` features whose thresholds are set, from one calibration pass, so
that about ``--l0`` features fire per token and layer (Gemma Scope's transcoders fire about 20-100).
Prompts are random ordinary tokens. Each run is written to the JSON file as soon as it finishes, so a
run cut short by a time limit still leaves the figures of the ones before it.

    python3 benchmarks/gpu_attribution.py --device cuda --out results/gpu_attribution.json
    .venv/bin/python benchmarks/gpu_attribution.py --shape tiny --device cpu --lengths 16,32   # a check here
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

SHAPES = {
    "gemma-2-2b": dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                       num_key_value_heads=4, head_dim=256, vocab_size=256_000, query_pre_attn_scalar=256,
                       sliding_window=4096, max_position_embeddings=8192),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=512, query_pre_attn_scalar=16, sliding_window=64,
                 max_position_embeddings=4096),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    import transformers
    from conftest import make_tiny_tokenizer

    from mechscope.models.loading import adapter_class_for

    config = transformers.Gemma2Config(**SHAPES[shape], attn_implementation="eager",
                                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    torch.manual_seed(seed)
    with torch.device(device):
        hf = transformers.Gemma2ForCausalLM(config).to(dtype)
    hf.eval()
    tokenizer = make_tiny_tokenizer()  # ordinary tokens only; the model's ids beyond it are never produced
    return adapter_class_for("gemma2")(hf, tokenizer, f"random-{shape}")


@torch.no_grad()
def build_transcoders(adapter, d_transcoder: int, l0: float, seed: int = 0):
    """Random JumpReLU transcoders: encoder rows of unit norm over each layer's input RMS, thresholds
    at the pre-activation quantile that leaves ``l0`` active features a token."""
    from mechscope.transcoders.transcoder import PerLayerTranscoder, PerLayerTranscoderSet

    gen = torch.Generator(device=adapter.device).manual_seed(seed)
    ids = torch.randint(3, len(adapter.tokenizer), (1, 128), generator=gen, device=adapter.device)
    ids[0, 0] = adapter.tokenizer.bos_token_id
    inputs, _ = adapter.run_with_mlp_sites(ids)
    transcoders = []
    d = adapter.d_model
    for layer in range(adapter.n_layers):
        tc = PerLayerTranscoder(d, d_transcoder, "jumprelu").to(adapter.device)
        x = inputs[layer][0, 1:].float()
        rms = x.pow(2).mean().sqrt()
        tc.W_enc.copy_(torch.randn(d_transcoder, d, generator=gen, device=adapter.device) / (rms * d))
        tc.W_dec.copy_(torch.randn(d_transcoder, d, generator=gen, device=adapter.device) * (rms / (l0 ** 0.5 * d ** 0.5)))
        pre = tc.pre_activations(x)
        k = max(1, int(round(l0 / d_transcoder * pre.numel())))
        threshold = pre.flatten().topk(k).values[-1]
        tc.activation_function.threshold.fill_(float(threshold))
        transcoders.append(tc)
    return PerLayerTranscoderSet(transcoders, model_name=adapter.name, scan=f"random-jumprelu-{d_transcoder}").requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="gemma-2-2b")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lengths", default="64,512,2048")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--d-transcoder", type=int, default=16384)
    parser.add_argument("--l0", type=float, default=20.0)
    parser.add_argument("--max-feature-nodes", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default=None, help="JSON file (written after every run)")
    args = parser.parse_args()

    from mechscope.attribution.attribute import AttributionConfig, attribute
    from mechscope.devices import resolve_device, resolve_dtype
    from mechscope.memory import peak_rss_mb
    from mechscope.replacement.replacement_model import ReplacementModel

    device = resolve_device(args.device)
    result = {"shape": args.shape, "device": str(device), "settings": vars(args), "runs": [],
              "torch": torch.__version__, "machine": platform.node(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}

    def save() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(args.out).with_suffix(".tmp")
            tmp.write_text(json.dumps(result, indent=1))
            os.replace(tmp, args.out)

    for dtype_name in args.dtypes.split(","):
        dtype = resolve_dtype(dtype_name)
        adapter = build_model(args.shape, device, dtype)
        transcoders = build_transcoders(adapter, args.d_transcoder, args.l0)
        rm = ReplacementModel(adapter, transcoders, max_prompt_tokens=max(int(n) for n in args.lengths.split(",")))
        gen = torch.Generator().manual_seed(1)
        for n_tokens in (int(n) for n in args.lengths.split(",")):
            ids = torch.randint(3, len(adapter.tokenizer), (n_tokens - 1,), generator=gen)
            prompt = adapter.tokenizer.decode(ids)
            while len(rm.tokenize(prompt)) > n_tokens:  # a char tokenizer: one token a character
                prompt = prompt[:-1]
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            graph = attribute(rm, prompt, AttributionConfig(max_feature_nodes=args.max_feature_nodes,
                                                            batch_size=args.batch_size))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
            run = {"dtype": dtype_name, "tokens": len(graph.input_ids), "active_features": len(graph.active_features),
                   "feature_nodes": graph.n_features, "attribution_s": round(seconds, 2),
                   "peak_gpu_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
                   "peak_rss_gib": round(peak_rss_mb() / 1024, 2)}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            save()
            del graph
        del rm, transcoders, adapter
        if device.type == "cuda":
            torch.cuda.empty_cache()
    save()


if __name__ == "__main__":
    main()
