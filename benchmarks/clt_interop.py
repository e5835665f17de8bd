"""Cross-layer transcoders between mechscope and circuit-tracer 0.5.0, both ways.

1. A CLT saved by mechscope (circuit-tracer's CLT layout) is opened with circuit-tracer's own
   ``load_clt`` (eager and lazy decoders); its activations and reconstructions on random inputs are
   compared with mechscope's.
2. A CLT built in circuit-tracer (its ``CrossLayerTranscoder`` with random parameters, written in its
   file layout: ``W_enc_{i}``, ``b_enc_{i}``, ``b_dec_{i}``, ``threshold_{i}``, ``W_dec_{i}``) is opened
   in mechscope and compared the same way.

Needs circuit-tracer in its own virtualenv: ``bash benchmarks/setup_circuit_tracer.sh``.

    .venv/bin/python benchmarks/clt_interop.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechscope.transcoders.activations import make_activation
from mechscope.transcoders.clt_io import load_clt, save_clt
from mechscope.transcoders.transcoder import CrossLayerTranscoderSet

CT_PYTHON = Path(__file__).parent / ".venv-ct" / "bin" / "python"
N_LAYERS, D_MODEL, D_TRANSCODER, N_POS = 4, 16, 24, 6

CT_SIDE = r'''
import sys, torch
from safetensors.torch import load_file, save_file
from circuit_tracer.transcoder.cross_layer_transcoder import CrossLayerTranscoder, load_clt
mode, path, inputs, out = sys.argv[1:5]
x = load_file(inputs)["x"]
if mode == "open":
    results = {}
    for lazy in (False, True):
        clt = load_clt(path, dtype=torch.float32, lazy_decoder=lazy, device=torch.device("cpu"))
        feats = clt.encode(x)
        results[f"acts_{int(lazy)}"] = feats.contiguous()
        results[f"recon_{int(lazy)}"] = clt.decode(feats.to_sparse()).contiguous()
    save_file(results, out)
else:  # build one in circuit-tracer, write its layout
    torch.manual_seed(1)
    n, f, d = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
    clt = CrossLayerTranscoder(n, f, d, activation_function="jump_relu", lazy_decoder=False, dtype=torch.float32,
                               device=torch.device("cpu"))
    with torch.no_grad():
        clt.W_enc.normal_(0, d ** -0.5); clt.b_enc.normal_(0, 0.1); clt.b_dec.normal_(0, 0.1)
        clt.activation_function.threshold.uniform_(0.1, 0.4)
        for W in clt.W_dec:
            W.normal_(0, f ** -0.5)
    import os
    os.makedirs(path, exist_ok=True)
    for i in range(n):
        save_file({f"W_enc_{i}": clt.W_enc[i].contiguous(), f"b_enc_{i}": clt.b_enc[i].contiguous(),
                   f"b_dec_{i}": clt.b_dec[i].contiguous(),
                   f"threshold_{i}": clt.activation_function.threshold[i].squeeze(0).contiguous()},
                  f"{path}/W_enc_{i}.safetensors")
        save_file({f"W_dec_{i}": clt.W_dec[i].detach().contiguous()}, f"{path}/W_dec_{i}.safetensors")
    feats = clt.encode(x)
    save_file({"acts": feats.contiguous(), "recon": clt.decode(feats.to_sparse()).contiguous()}, out)
'''


def random_clt() -> CrossLayerTranscoderSet:
    gen = torch.Generator().manual_seed(0)
    clt = CrossLayerTranscoderSet(N_LAYERS, D_MODEL, D_TRANSCODER, "jumprelu", scan="interop")
    with torch.no_grad():
        for layer in range(N_LAYERS):
            clt.W_enc[layer].copy_(torch.randn(D_TRANSCODER, D_MODEL, generator=gen) / D_MODEL**0.5)
            clt.b_enc[layer].copy_(0.1 * torch.randn(D_TRANSCODER, generator=gen))
            clt.b_dec[layer].copy_(0.1 * torch.randn(D_MODEL, generator=gen))
            clt.W_dec[layer].copy_(torch.randn(D_TRANSCODER, N_LAYERS - layer, D_MODEL, generator=gen) / D_TRANSCODER**0.5)
            clt.activation_functions[layer] = make_activation(
                "jumprelu", D_TRANSCODER, threshold=0.1 + 0.3 * torch.rand(D_TRANSCODER, generator=gen))
    return clt.requires_grad_(False)


def ours(clt: CrossLayerTranscoderSet, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = [clt.encode(layer, x[layer]) for layer in range(clt.n_layers)]
    return torch.stack(acts), torch.stack(clt.reconstruct(acts, list(x)))


def main() -> None:
    if not CT_PYTHON.exists():
        raise SystemExit("circuit-tracer is not installed: bash benchmarks/setup_circuit_tracer.sh")
    x = torch.randn(N_LAYERS, N_POS, D_MODEL, generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_file({"x": x}, str(tmp / "x.safetensors"))
        clt = random_clt()
        save_clt(clt, tmp / "ours")
        subprocess.run([str(CT_PYTHON), "-c", CT_SIDE, "open", str(tmp / "ours"), str(tmp / "x.safetensors"),
                        str(tmp / "ct.safetensors")], check=True)
        theirs = load_file(str(tmp / "ct.safetensors"))
        acts, recon = ours(clt, x)
        print(f"mechscope -> circuit-tracer: {int((acts > 0).sum())} of {acts.numel()} activations fire")
        for lazy in (0, 1):
            print(f"  circuit-tracer load_clt(lazy_decoder={bool(lazy)}): max |activation diff| "
                  f"{float((theirs[f'acts_{lazy}'] - acts).abs().max()):.2e}, max |reconstruction diff| "
                  f"{float((theirs[f'recon_{lazy}'] - recon).abs().max()):.2e}")
        subprocess.run([str(CT_PYTHON), "-c", CT_SIDE, "build", str(tmp / "theirs"), str(tmp / "x.safetensors"),
                        str(tmp / "ct2.safetensors"), str(N_LAYERS), str(D_TRANSCODER), str(D_MODEL)], check=True)
        built = load_file(str(tmp / "ct2.safetensors"))
        for lazy in (False, True):
            mine = load_clt(tmp / "theirs", config={}, lazy_decoder=lazy)
            acts, recon = ours(mine, x)
            print(f"circuit-tracer -> mechscope (lazy_decoder={lazy}): {int((acts > 0).sum())} firing; max |activation "
                  f"diff| {float((built['acts'] - acts).abs().max()):.2e}, max |reconstruction diff| "
                  f"{float((built['recon'] - recon).abs().max()):.2e}")


if __name__ == "__main__":
    sys.exit(main())
