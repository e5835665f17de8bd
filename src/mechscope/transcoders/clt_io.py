"""Cross-layer transcoders in circuit-tracer's CLT layout (read and written).

A directory with ``config.yaml`` (``model_kind: cross_layer_transcoder``, ``model_name``, ``scan``,
hooks, sizes, ``activation``) and per layer ``i``:

- ``W_enc_{i}.safetensors``: ``W_enc_{i} [d_transcoder, d_model]``, ``b_enc_{i} [d_transcoder]``,
  ``b_dec_{i} [d_model]`` (the bias of output layer ``i``), ``threshold_{i} [d_transcoder]`` for
  JumpReLU, and mechscope's ``W_skip_{i} [d_model, d_model]`` when the set has a skip connection
  (circuit-tracer's ``load_clt`` reads no skip from disk and ignores the key);
- ``W_dec_{i}.safetensors``: ``W_dec_{i} [d_transcoder, n_layers - i, d_model]`` (a feature of layer
  ``i`` writes to layers ``i .. n_layers - 1``).

This is what circuit-tracer's ``CrossLayerTranscoder.save_to_safetensors`` writes and ``load_clt``
reads.

Gemma Scope 2 CLT directories are read too: ``params_layer_{L}.safetensors`` per layer with
``w_enc [d_model, d_sae]``, ``b_enc [d_sae]``, ``threshold [d_sae]``, ``b_dec [d_model]`` (output
layer ``L``'s bias), ``w_dec [d_sae, n_layers, d_model]`` (a decoder to every layer; the columns of
layers before ``L`` are unused by a cross-layer transcoder and dropped) and optionally
``affine_skip_connection [d_model, d_model]`` applied as ``x @ A``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from mechscope.errors import CorruptFileError
from mechscope.paths import atomic_directory
from mechscope.transcoders.files import open_safetensors, read_safetensors
from mechscope.transcoders.activations import make_activation
from mechscope.transcoders.transcoder import CrossLayerTranscoderSet

__all__ = ["save_clt", "load_clt", "CLT_KIND", "is_gemma_scope_2_clt", "load_gemma_scope_2_clt"]

CLT_KIND = "cross_layer_transcoder"


def save_clt(clt: CrossLayerTranscoderSet, path: str | Path, dtype: torch.dtype = torch.float32,
             extra_config: dict | None = None) -> Path:
    """Write ``clt`` in circuit-tracer's CLT layout (atomically: a failed save leaves nothing)."""
    path = Path(path)
    config = {"model_kind": CLT_KIND, "model_name": clt.model_name, "scan": clt.scan or path.name,
              "feature_input_hook": clt.feature_input_hook, "feature_output_hook": clt.feature_output_hook,
              "d_model": clt.d_model, "d_transcoder": clt.d_transcoder(0), "n_layers": clt.n_layers,
              "skip_connection": clt.W_skip is not None, "activation": clt.activation}
    if clt.activation == "topk":
        config["k"] = clt.activation_functions[0].k
    config.update(extra_config or {})

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype).contiguous()

    with atomic_directory(path) as tmp:
        for i in range(clt.n_layers):
            enc = {f"W_enc_{i}": cast(clt.W_enc[i]), f"b_enc_{i}": cast(clt.b_enc[i]), f"b_dec_{i}": cast(clt.b_dec[i])}
            if clt.activation == "jumprelu":
                enc[f"threshold_{i}"] = cast(clt.activation_functions[i].threshold)
            if clt.W_skip is not None:
                enc[f"W_skip_{i}"] = cast(clt.W_skip[i])
            save_file(enc, str(tmp / f"W_enc_{i}.safetensors"))
            save_file({f"W_dec_{i}": cast(clt.W_dec[i])}, str(tmp / f"W_dec_{i}.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


class LazyDecoders:
    """Decoder rows read from ``W_dec_{i}.safetensors`` on demand (memory-mapped, only the rows asked
    for), so a CLT whose decoders, ``n_layers (n_layers + 1) / 2`` blocks of ``[F, d_model]``, do not
    fit in memory still traces: attribution and reconstruction read the rows of active features.

    Args:
        d_transcoder, d_model: each file's ``W_dec_{i}`` must be ``[d_transcoder, n_layers - i, d_model]``.

    Raises:
        CorruptFileError: a missing, truncated or unreadable file, or a ``W_dec_{i}`` missing or of
            another shape (checked from the headers when opened, not at the first read).
    """

    def __init__(self, path: Path, n_layers: int, d_transcoder: int, d_model: int):
        self.handles = []
        for i in range(n_layers):
            key = f"W_dec_{i}"
            handle = open_safetensors(path / f"{key}.safetensors")
            expected = (d_transcoder, n_layers - i, d_model)
            got = tuple(handle.get_slice(key).get_shape()) if key in handle.keys() else "missing"
            if got != expected:
                raise CorruptFileError(f"{path}: {key} should be {expected}, got {got}")
            self.handles.append(handle)

    def rows(self, layer: int, features: torch.Tensor) -> torch.Tensor:
        """``[n, n_layers - layer, d_model]`` float32 rows ``features`` of layer ``layer``'s decoder."""
        view = self.handles[layer].get_slice(f"W_dec_{layer}")
        features = features.tolist()
        if not features:
            n_out, d_model = view.get_shape()[1:]
            return torch.zeros(0, n_out, d_model)
        out, start = [], 0
        while start < len(features):  # read runs of consecutive rows in one slice each
            end = start + 1
            while end < len(features) and features[end] == features[end - 1] + 1:
                end += 1
            out.append(view[features[start] : features[end - 1] + 1])
            start = end
        return torch.cat(out).float()


def load_clt(path: str | Path, config: dict | None = None, lazy_decoder: bool = False) -> CrossLayerTranscoderSet:
    """Read a CLT directory (mechscope's or circuit-tracer's). Without ``activation`` in the config,
    the files decide, as circuit-tracer does: JumpReLU when they hold thresholds, else ReLU.

    Args:
        lazy_decoder: leave the decoders on disk and read only the rows asked for
            (:class:`LazyDecoders`); the set's ``W_dec`` parameters then stay zero-sized.

    Raises:
        CorruptFileError: a missing or truncated file, or tensors of the wrong shape.
    """
    path = Path(path)
    config = config if config is not None else yaml.safe_load((path / "config.yaml").read_text())
    n_layers = len(list(path.glob("W_enc_*.safetensors")))
    if n_layers == 0:
        raise CorruptFileError(f"{path} holds no W_enc_*.safetensors files")
    enc = [read_safetensors(path / f"W_enc_{i}.safetensors") for i in range(n_layers)]
    d_transcoder, d_model = enc[0]["W_enc_0"].shape
    activation = config.get("activation") or ("jumprelu" if "threshold_0" in enc[0] else "relu")
    skip = "W_skip_0" in enc[0]
    clt = CrossLayerTranscoderSet(n_layers, d_model, d_transcoder, activation, config.get("k"), skip,
                                  model_name=config.get("model_name", ""), scan=config.get("scan", path.name),
                                  decoders=not lazy_decoder)
    if lazy_decoder:
        clt.lazy_decoder = LazyDecoders(path, n_layers, d_transcoder, d_model)
    with torch.no_grad():
        for i in range(n_layers):
            dec = {} if lazy_decoder else read_safetensors(path / f"W_dec_{i}.safetensors")
            tensors = {"W_enc": (enc[i], f"W_enc_{i}"), "b_enc": (enc[i], f"b_enc_{i}"), "b_dec": (enc[i], f"b_dec_{i}")}
            tensors |= {} if lazy_decoder else {"W_dec": (dec, f"W_dec_{i}")}
            tensors |= {"W_skip": (enc[i], f"W_skip_{i}")} if skip else {}
            for name, (source, key) in tensors.items():
                target = getattr(clt, name)[i]
                if key not in source or source[key].shape != target.shape:
                    got = tuple(source[key].shape) if key in source else "missing"
                    raise CorruptFileError(f"{path}: {key} should be {tuple(target.shape)}, got {got}")
                target.copy_(source[key].float())
            if activation == "jumprelu":
                clt.activation_functions[i] = make_activation("jumprelu", d_transcoder,
                                                              threshold=enc[i][f"threshold_{i}"].float().reshape(-1))
    return clt.requires_grad_(False)


def _gemma_scope_2_clt_files(path: Path) -> list[Path]:
    files = sorted(path.glob("params_layer_*.safetensors"), key=lambda f: int(f.stem.rsplit("_", 1)[1]))
    return files


def is_gemma_scope_2_clt(path: Path) -> bool:
    """Whether ``path`` itself holds Gemma Scope 2 CLT files (``params_layer_{L}.safetensors``)."""
    return bool(_gemma_scope_2_clt_files(Path(path)))


def load_gemma_scope_2_clt(path: str | Path, model_name: str = "") -> CrossLayerTranscoderSet:
    """Read a Gemma Scope 2 CLT directory (see the module docstring).

    Raises:
        CorruptFileError: a missing layer, a missing tensor or a decoder of the wrong shape.
    """
    path = Path(path)
    files = _gemma_scope_2_clt_files(path)
    layers = [int(f.stem.rsplit("_", 1)[1]) for f in files]
    if layers != list(range(len(files))):
        raise CorruptFileError(f"{path}: expected params_layer_0..{len(files) - 1}.safetensors, found layers {layers}")
    n_layers = len(files)
    params = [read_safetensors(f) for f in files]
    for f, p in zip(files, params):
        missing = [k for k in ("w_enc", "b_enc", "b_dec", "w_dec", "threshold") if k not in p]
        if missing:
            raise CorruptFileError(f"{f} lacks Gemma Scope tensors {missing}; has {sorted(p)}")
    d_model, d_sae = params[0]["w_enc"].shape
    skip = "affine_skip_connection" in params[0]
    clt = CrossLayerTranscoderSet(n_layers, d_model, d_sae, "jumprelu", skip_connection=skip, model_name=model_name,
                                  scan=path.name)
    with torch.no_grad():
        for layer, (f, p) in enumerate(zip(files, params)):
            if p["w_dec"].shape != (d_sae, n_layers, d_model):
                raise CorruptFileError(f"{f}: w_dec should be {(d_sae, n_layers, d_model)}, got {tuple(p['w_dec'].shape)}")
            clt.W_enc[layer].copy_(p["w_enc"].T.float())  # (d_model, d_sae) -> circuit-tracer's (d_sae, d_model)
            clt.b_enc[layer].copy_(p["b_enc"].float())
            clt.b_dec[layer].copy_(p["b_dec"].float())
            clt.W_dec[layer].copy_(p["w_dec"][:, layer:].float())  # to layers layer..n_layers-1
            if skip:
                clt.W_skip[layer].copy_(p["affine_skip_connection"].T.float())  # x @ A == x @ W_skip.T
            clt.activation_functions[layer] = make_activation("jumprelu", d_sae, threshold=p["threshold"].float())
    return clt.requires_grad_(False)
