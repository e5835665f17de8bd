"""Save and load transcoder sets.

Layouts read and written:

- **circuit-tracer / mechscope** (the native one): a directory with ``config.yaml`` and
  ``layer_{i}.safetensors`` per layer holding ``W_enc [d_transcoder, d_model]``,
  ``W_dec [d_transcoder, d_model]``, ``b_enc [d_transcoder]``, ``b_dec [d_model]``, optionally
  ``activation_function.threshold [d_transcoder]`` (JumpReLU) and ``W_skip [d_model, d_model]``.
  ``config.yaml`` carries ``model_kind: transcoder_set``, ``model_name``, ``scan``,
  ``feature_input_hook: mlp.hook_in``, ``feature_output_hook: hook_mlp_out``, ``transcoders``
  (the layer files, relative to the directory) and, for TopK sets, ``activation: topk`` and ``k``.
  circuit-tracer 0.5.0 opens such a directory with ``load_transcoder_from_hub("/absolute/dir")``
  (its local-cache branch; a relative path is taken for a Hub id). That branch globs the layer
  files, ignores ``transcoders``, ``activation`` and ``k``, and picks JumpReLU when a file has a
  threshold and ReLU otherwise — so a TopK set opens there as ReLU. Reading, mechscope follows the
  same rule when ``activation`` is absent, and takes the 0-dim ``k`` tensor that circuit-tracer's
  git main writes into TopK layer files.
- **Gemma Scope 2** (read only): per layer a ``params.safetensors`` with ``w_enc [d_model, d_sae]``,
  ``w_dec [d_sae, d_model]``, ``b_enc``, ``b_dec``, ``threshold`` and optionally
  ``affine_skip_connection [d_model, d_model]`` (applied as ``x @ A``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from mechscope.errors import BadInputError, CorruptFileError, UnknownNameError
from mechscope.paths import atomic_directory, cache_root
from mechscope.transcoders.files import read_safetensors
from mechscope.transcoders.sparsify import is_sparsify_dir, load_sparsify
from mechscope.transcoders.clt_io import CLT_KIND, is_gemma_scope_2_clt, load_clt, load_gemma_scope_2_clt, save_clt
from mechscope.transcoders.transcoder import (
    CrossLayerTranscoderSet,
    PerLayerTranscoder,
    PerLayerTranscoderSet,
    TranscoderSet,
)

__all__ = [
    "save_transcoder_set",
    "load_transcoder_set",
    "load_gemma_scope_2",
    "shipped_sets",
    "install_line",
    "resolve_transcoders",
    "default_transcoders_for",
]

#: entry point group through which installed set packages announce themselves: ``NAME = "module"``,
#: the module's directory holding ``files/`` (config.yaml and the layer files)
ENTRY_POINT_GROUP = "mechscope.transcoder_sets"
#: sets named here before their package exists (trained, not yet shipped)
IN_TRAINING = {"qwen2.5-coder-0.5b-instruct-plt-v1": "bash scripts/train_qwen_set.sh"}
#: the sets mechscope's repository ships, each its own distribution under ``sets/<name>/``
KNOWN_SETS = {
    "gemma-3-270m-plt-v1": "mechscope-set-gemma-3-270m-plt-v1",
    "gemma-3-270m-clt-v1": "mechscope-set-gemma-3-270m-clt-v1",
    "qwen2.5-coder-0.5b-instruct-plt-v1": "mechscope-set-qwen2-5-coder-0-5b-instruct-plt-v1",
}
#: the set used when a model is traced without ``--transcoders``
DEFAULTS = {
    "google/gemma-3-270m": "gemma-3-270m-plt-v1",
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": "qwen2.5-coder-0.5b-instruct-plt-v1",
}


def _installed_sets() -> dict[str, Path]:
    """Installed set packages by name -> their ``files`` directory (found without importing them)."""
    import importlib.metadata
    import importlib.util

    found = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        spec = importlib.util.find_spec(ep.value)
        if spec is not None and spec.origin is not None:
            found[ep.name] = Path(spec.origin).parent / "files"
    return found


def shipped_sets() -> list[str]:
    """Names of the installed shipped transcoder sets (packages in the ``mechscope.transcoder_sets``
    entry point group)."""
    return sorted(name for name, path in _installed_sets().items() if (path / "config.yaml").exists())


def _repository_has(name: str) -> bool:
    """Whether the checkout mechscope runs from (an editable install) holds ``sets/<name>``."""
    return (Path(__file__).resolve().parents[3] / "sets" / name / "pyproject.toml").exists()


def install_line(name: str) -> str:
    """How to install a shipped set that is missing (from a mechscope checkout)."""
    return f"pip install ./sets/{name}  (the {KNOWN_SETS[name]} package in mechscope's repository; scripts/setup.sh installs it)"


def default_transcoders_for(model_id: str) -> str:
    """Name of the shipped set for a model id.

    Raises:
        BadInputError: when mechscope ships no set for the model.
    """
    if model_id not in DEFAULTS:
        raise BadInputError(
            f"no default transcoder set for model {model_id!r}; pass --transcoders "
            f"(shipped sets: {', '.join(shipped_sets()) or 'none'})"
        )
    return DEFAULTS[model_id]


def resolve_transcoders(name_or_path: str) -> Path:
    """Directory of a shipped set name, a local set directory, the name of a set trained here
    (``mechscope train --name NAME`` saves it in ``<cache>/transcoders/NAME``), or a set on the
    Hugging Face hub (``ORG/REPO[//SUBFOLDER][@REVISION]`` or ``hf://...``, fetched into the hub
    cache by :func:`mechscope.transcoders.hub.fetch_transcoders`).

    Raises:
        BadInputError: a known shipped set whose package is not installed (names the install line); a
            hub set neither cached nor reachable (offline: names the cache directory and the file).
        UnknownNameError: neither a shipped name, a set directory nor a hub reference.
    """
    installed = _installed_sets()
    if name_or_path in installed and (installed[name_or_path] / "config.yaml").exists():
        return installed[name_or_path]
    if name_or_path in IN_TRAINING and not _repository_has(name_or_path):
        raise BadInputError(f"transcoder set {name_or_path!r} is not shipped yet (it is trained by "
                            f"`{IN_TRAINING[name_or_path]}` in a mechscope checkout); pass --transcoders DIR")
    if name_or_path in KNOWN_SETS:
        raise BadInputError(f"transcoder set {name_or_path!r} is not installed: {install_line(name_or_path)}")
    path = Path(name_or_path).expanduser()
    if path.is_dir() and ((path / "config.yaml").exists() or _is_gemma_scope_2(path) or is_gemma_scope_2_clt(path)
                          or is_sparsify_dir(path)):
        return path
    trained = cache_root() / "transcoders" / name_or_path  # `mechscope train --name NAME` saves here
    if not path.exists() and "/" not in name_or_path and (trained / "config.yaml").exists():
        return trained
    from mechscope.transcoders.hub import fetch_transcoders, looks_like_hub_id

    if not path.exists() and looks_like_hub_id(name_or_path):
        return fetch_transcoders(name_or_path)
    raise UnknownNameError("transcoder set", name_or_path, shipped_sets())


def save_transcoder_set(
    transcoders: PerLayerTranscoderSet,
    path: str | os.PathLike,
    dtype: torch.dtype = torch.float32,
    extra_config: dict | None = None,
) -> Path:
    """Write a set in circuit-tracer's layout, atomically (temp directory, then rename).

    Args:
        dtype: storage dtype of the weights (bfloat16 halves the size; loading upcasts).
        extra_config: more keys for ``config.yaml`` (training metadata, metrics).
    """
    if isinstance(transcoders, CrossLayerTranscoderSet):
        return save_clt(transcoders, path, dtype, extra_config)
    path = Path(path)
    first = transcoders[0]
    config = {
        "model_kind": "transcoder_set",
        "model_name": transcoders.model_name,
        "scan": transcoders.scan or path.name,
        "feature_input_hook": transcoders.feature_input_hook,
        "feature_output_hook": transcoders.feature_output_hook,
        "transcoders": [f"layer_{i}.safetensors" for i in range(transcoders.n_layers)],
        "d_model": transcoders.d_model,
        "d_transcoder": first.d_transcoder,
        "n_layers": transcoders.n_layers,
        "skip_connection": first.W_skip is not None,
    }
    if first.activation == "topk":
        config.update(activation="topk", k=first.activation_function.k)
    elif first.activation == "relu":
        config["activation"] = "relu"
    else:
        config["activation"] = "jumprelu"
    config.update(extra_config or {})
    with atomic_directory(path) as tmp:  # a failed or interrupted save leaves neither a half set nor its temp dir
        for i, tc in enumerate(transcoders.transcoders):
            tensors = {k: v.detach().to(dtype).contiguous() for k, v in tc.state_dict().items()}
            save_file(tensors, str(tmp / f"layer_{i}.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _transcoder_from_tensors(
    tensors: dict[str, torch.Tensor], activation: str | None, k: int | None, file: Path
) -> PerLayerTranscoder:
    required = ("W_enc", "W_dec", "b_enc", "b_dec")
    missing = [key for key in required if key not in tensors]
    if missing:
        raise CorruptFileError(f"{file} lacks tensors {missing}; has {sorted(tensors)}")
    d_transcoder, d_model = tensors["W_enc"].shape
    tensors = dict(tensors)
    k_tensor = tensors.pop("k", None)  # circuit-tracer main: TopK's k as a 0-dim tensor per layer file
    if k_tensor is not None:
        if k is not None and int(k_tensor) != k:
            raise CorruptFileError(f"{file} holds k={int(k_tensor)} but config.yaml says k={k}")
        k, activation = int(k_tensor), activation or "topk"
    if activation is None:  # circuit-tracer's rule (load_relu_transcoder): a threshold means JumpReLU
        activation = "jumprelu" if "activation_function.threshold" in tensors else "relu"
    elif "activation_function.threshold" in tensors and activation not in ("topk", "relu"):
        activation = "jumprelu"
    tc = PerLayerTranscoder(d_model, d_transcoder, activation, k, skip_connection="W_skip" in tensors)
    state = {key: value.float() for key, value in tensors.items()}
    try:
        tc.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CorruptFileError(f"{file} has tensors of unexpected shapes: {e}") from e
    return tc


def load_transcoder_set(name_or_path: str | os.PathLike, device: str | None = None) -> TranscoderSet:
    """Load a shipped set by name, a circuit-tracer-layout directory (per-layer or cross-layer), or a
    Gemma Scope 2 directory, onto ``device`` (default: the CPU; a
    :class:`~mechscope.replacement.replacement_model.ReplacementModel` moves a set to its model's
    devices anyway).

    Raises:
        UnknownNameError: the name is neither shipped nor a directory.
        CorruptFileError: a layer file is missing, truncated or has the wrong tensors.
        BadInputError: a device that is not there.
    """
    name = str(name_or_path)
    path = resolve_transcoders(name)
    tcs = _load_transcoder_set(path)
    from mechscope.transcoders.hub import looks_like_hub_id, parse_hub_ref

    if not Path(name).expanduser().exists() and name not in _installed_sets() and looks_like_hub_id(name):
        if not tcs.scan or tcs.scan == path.name:  # a hub snapshot's folder name says nothing: use the reference
            tcs.scan = str(parse_hub_ref(name))
    if device is not None:
        from mechscope.devices import resolve_device

        target = resolve_device(device)
        if target.type != "cpu":
            tcs = tcs.to(target)
    return tcs


def _load_transcoder_set(path: Path) -> TranscoderSet:
    """The set in the directory ``path`` (resolved by :func:`resolve_transcoders`)."""
    if not (path / "config.yaml").exists():
        if is_sparsify_dir(path):
            return load_sparsify(path)
        return load_gemma_scope_2_clt(path) if is_gemma_scope_2_clt(path) else load_gemma_scope_2(path)
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except yaml.YAMLError as e:
        raise CorruptFileError(f"cannot parse {path / 'config.yaml'}: {e}") from e
    if config.get("model_kind") == CLT_KIND:
        return load_clt(path, config, lazy_decoder=True)  # decoder rows read on demand: only active features
    if config.get("model_kind", "transcoder_set") != "transcoder_set":
        raise BadInputError(
            f"{path} holds a {config.get('model_kind')!r}; mechscope reads model_kind 'transcoder_set' "
            f"and {CLT_KIND!r}"
        )
    files = config.get("transcoders") or sorted(
        (p.name for p in path.glob("layer_*.safetensors")), key=lambda n: int(n[6:].split(".")[0])
    )
    activation = config.get("activation")
    k = config.get("k")
    transcoders = []
    for name in files:
        if str(name).startswith("hf://"):  # circuit-tracer's hub configs list their layer files as URIs
            from mechscope.transcoders.hub import download_uri

            file = download_uri(str(name))
        else:
            file = Path(name) if Path(name).is_absolute() else path / Path(name).name
        transcoders.append(_transcoder_from_tensors(read_safetensors(file), activation, k, file))
    result = PerLayerTranscoderSet(
        transcoders, model_name=config.get("model_name", ""), scan=config.get("scan", path.name)
    )
    return result.requires_grad_(False)


def _gemma_scope_2_files(path: Path) -> list[Path]:
    """The layer files of a Gemma Scope 2 directory: ``path/layer_*/params.safetensors`` one level
    down and no deeper, so a directory is what it names, not what some folder below it holds."""
    return sorted(path.glob("layer_*/params.safetensors"), key=_layer_number)


def _is_gemma_scope_2(path: Path) -> bool:
    return bool(_gemma_scope_2_files(path))


def load_gemma_scope_2(path: str | os.PathLike, model_name: str = "") -> PerLayerTranscoderSet:
    """Load Gemma Scope 2 per-layer transcoders from ``path/layer_{i}*/params.safetensors``.

    Gemma Scope 2 stores ``w_enc`` as ``[d_model, d_sae]`` (transposed here to circuit-tracer's
    ``W_enc [d_sae, d_model]``) and the affine skip as ``[d_in, d_out]`` (``W_skip = A.T``).
    """
    path = Path(path)
    files = _gemma_scope_2_files(path)
    if not files:
        raise UnknownNameError("transcoder set", str(path), shipped_sets())
    layers = [_layer_number(f) for f in files]
    for layer in sorted(set(layers)):
        variants = [f.parent.name for f, n in zip(files, layers) if n == layer]
        if len(variants) > 1:
            raise BadInputError(
                f"{path} holds {len(variants)} Gemma Scope 2 transcoders for layer {layer} ({', '.join(variants)}); "
                "point --transcoders at a directory with one layer_* directory per layer"
            )
    transcoders = []
    for file in files:
        raw = read_safetensors(file)
        missing = [key for key in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if key not in raw]
        if missing:
            raise CorruptFileError(f"{file} lacks Gemma Scope tensors {missing}; has {sorted(raw)}")
        tensors = {
            "W_enc": raw["w_enc"].T.contiguous(),
            "W_dec": raw["w_dec"],
            "b_enc": raw["b_enc"],
            "b_dec": raw["b_dec"],
            "activation_function.threshold": raw["threshold"],
        }
        if "affine_skip_connection" in raw:
            tensors["W_skip"] = raw["affine_skip_connection"].T.contiguous()
        transcoders.append(_transcoder_from_tensors(tensors, "jumprelu", None, file))
    return PerLayerTranscoderSet(transcoders, model_name=model_name, scan=path.name).requires_grad_(False)


def _layer_number(file: Path) -> int:
    for part in reversed(file.parts):
        if part.startswith("layer_"):
            digits = "".join(ch for ch in part[6:] if ch.isdigit() or ch == "_").split("_")[0]
            if digits.isdigit():
                return int(digits)
    raise BadInputError(f"cannot tell the layer of {file}; expected a 'layer_<i>' directory")
