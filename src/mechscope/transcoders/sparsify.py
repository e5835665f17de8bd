"""Transcoders saved by EleutherAI's sparsify (``SparseCoder.save_to_disk``, trained with ``--transcode``).

Layout: one folder per hookpoint (``layers.{i}.mlp``, ``model.layers.{i}.mlp``, ``h.{i}.mlp``), each with
``cfg.json`` (``d_in``, ``num_latents`` or ``expansion_factor``, ``k``, ``transcode``, ``skip_connection``)
and ``sae.safetensors`` (``encoder.weight [F, d_in]``, ``encoder.bias [F]``, ``W_dec [F, d_in]``,
``b_dec [d_in]``, optional ``W_skip [d_in, d_in]`` applied as ``x @ W_skip.T``). The activation is TopK
over ReLU'd pre-activations, which is mechscope's ``topk``. The hookpoint is the MLP module: its input
and output are mechscope's transcoder sites wherever no norm follows the MLP (Llama, Qwen, GPT-2; not
Gemma, whose post-feedforward norm is part of mechscope's output site).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from mechscope.errors import BadInputError, CorruptFileError
from mechscope.transcoders.files import read_safetensors
from mechscope.transcoders.transcoder import PerLayerTranscoder, PerLayerTranscoderSet

__all__ = ["is_sparsify_dir", "load_sparsify"]

_LAYER = re.compile(r"(?:^|\.)(\d+)\.mlp$")


def _hookpoints(path: Path) -> dict[int, Path]:
    found = {}
    for cfg in path.glob("*/cfg.json"):
        match = _LAYER.search(cfg.parent.name)
        if match and (cfg.parent / "sae.safetensors").exists():
            found[int(match[1])] = cfg.parent
    return found


def is_sparsify_dir(path: Path) -> bool:
    """Whether ``path`` holds sparsify hookpoint folders ``*.{i}.mlp/{cfg.json, sae.safetensors}``."""
    return bool(_hookpoints(Path(path)))


def load_sparsify(path: str | Path, model_name: str = "") -> PerLayerTranscoderSet:
    """Load a sparsify transcoder directory as a per-layer TopK set.

    Raises:
        BadInputError: sparse autoencoders (``transcode: false``) or a layer missing between 0 and the last.
        CorruptFileError: a ``cfg.json`` or ``sae.safetensors`` that cannot be read or lacks tensors.
    """
    path = Path(path)
    hookpoints = _hookpoints(path)
    if not hookpoints:
        raise BadInputError(f"{path} holds no sparsify hookpoint folders (layers.N.mlp/cfg.json)")
    missing = sorted(set(range(max(hookpoints) + 1)) - set(hookpoints))
    if missing:
        raise BadInputError(f"{path} has sparsify transcoders for layers {sorted(hookpoints)} but not {missing}; "
                            "mechscope needs one for every layer")
    transcoders = []
    for layer in range(len(hookpoints)):
        folder = hookpoints[layer]
        try:
            cfg = json.loads((folder / "cfg.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CorruptFileError(f"cannot read {folder / 'cfg.json'}: {e}") from e
        if not cfg.get("transcode", False):
            raise BadInputError(f"{folder} is a sparse autoencoder (transcode: false); mechscope needs transcoders")
        raw = read_safetensors(folder / "sae.safetensors")
        needed = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
        lacking = [key for key in needed if key not in raw]
        if lacking:
            raise CorruptFileError(f"{folder / 'sae.safetensors'} lacks sparsify tensors {lacking}; has {sorted(raw)}")
        d_transcoder, d_model = raw["encoder.weight"].shape
        k = int(cfg.get("k", 0))
        if k < 1:
            raise CorruptFileError(f"{folder / 'cfg.json'} gives no TopK k (k={cfg.get('k')!r})")
        tc = PerLayerTranscoder(d_model, d_transcoder, "topk", k, skip_connection="W_skip" in raw)
        state = {"W_enc": raw["encoder.weight"], "b_enc": raw["encoder.bias"], "W_dec": raw["W_dec"], "b_dec": raw["b_dec"]}
        if "W_skip" in raw:
            state["W_skip"] = raw["W_skip"]
        try:
            tc.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
        except RuntimeError as e:
            raise CorruptFileError(f"{folder / 'sae.safetensors'} has tensors of unexpected shapes: {e}") from e
        transcoders.append(tc)
    return PerLayerTranscoderSet(transcoders, model_name=model_name, scan=path.name).requires_grad_(False)
