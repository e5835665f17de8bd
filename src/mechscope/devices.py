"""Where tensors live: ``--device cpu|cuda|cuda:N|mps|auto`` and ``--dtype`` for every command and
``device=`` in the Python API.

Rules the pipeline follows (so that a CUDA run and a CPU run give the same graph):

- the model's weights and the transcoders sit on one device (or, with a device map, each layer on its
  own: a layer's transcoder follows that layer's MLP, see :func:`layer_devices`);
- every tensor the pipeline creates is created on the device of the data it goes with;
- results that are saved or held across the whole run (edge rows, graphs, feature stores,
  checkpoints) are CPU copies, so the CPU-only memory tricks (page release, heap trimming,
  :mod:`mechscope.memory`) stay on the CPU and a graph saved on a GPU machine opens anywhere.
"""

from __future__ import annotations

import torch

from mechscope.errors import BadInputError

__all__ = ["DTYPES", "available_devices", "resolve_device", "resolve_dtype", "check_device_map", "layer_devices"]

#: the ``--dtype`` choices: parameter dtypes of the model (transcoders and edges stay float32)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_devices() -> list[str]:
    """The devices this process can use, e.g. ``['cpu']`` or ``['cpu', 'cuda:0', 'cuda:1']``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device ``spec`` names: ``auto`` (or ``None``) is CUDA when present (the current CUDA device,
    which ``torchrun`` sets per rank through ``LOCAL_RANK``), else CPU; ``cuda`` is the current CUDA
    device, ``cuda:N`` the N-th; ``mps`` Apple's GPU.

    Raises:
        BadInputError: a device that is not there, or a malformed name; the message lists what is
            available.
    """
    available = available_devices()
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device(_current_cuda()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise BadInputError(f"--device {spec!r} is not a device name; choose from auto, "
                            f"{', '.join(available)}") from e
    if device.type == "cuda":
        if device.index is None and torch.cuda.is_available():
            device = torch.device(_current_cuda())
        if f"cuda:{device.index}" not in available:
            raise BadInputError(f"--device {spec!r} is not available on this machine "
                                f"({_why_no_cuda()}); available: auto, {', '.join(available)}")
    elif device.type == "mps":
        if "mps" not in available:
            raise BadInputError(f"--device 'mps' is not available on this machine; available: auto, {', '.join(available)}")
        device = torch.device("mps")
    elif device.type != "cpu":
        raise BadInputError(f"--device {spec!r}: mechscope runs on cpu, cuda and mps; available: auto, "
                            f"{', '.join(available)}")
    return device


def _current_cuda() -> str:
    import os

    local = os.environ.get("LOCAL_RANK")
    if local is not None and torch.cuda.device_count() > 1:
        return f"cuda:{int(local) % torch.cuda.device_count()}"
    return f"cuda:{torch.cuda.current_device()}"


def _why_no_cuda() -> str:
    if not torch.cuda.is_available():
        build = torch.version.cuda
        return "no CUDA device" + ("" if build else "; this torch is a CPU-only build")
    return f"{torch.cuda.device_count()} CUDA device(s)"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``float32`` | ``bfloat16`` | ``float16`` (or a ``torch.dtype``) as a ``torch.dtype``.

    Raises:
        BadInputError: another name.
    """
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise BadInputError(f"dtype {name} is not supported; choose from {', '.join(DTYPES)}")
        return name
    try:
        return DTYPES[str(name).removeprefix("torch.")]
    except KeyError:
        raise BadInputError(f"--dtype {name!r} is not supported; choose from {', '.join(DTYPES)}") from None


def check_device_map(device_map: str | None) -> str | None:
    """Validate ``--device-map``: ``auto`` (spread the layers over every visible GPU, through
    accelerate's ``from_pretrained(device_map="auto")``), or ``None``.

    Raises:
        BadInputError: a device map on a machine without CUDA, or a value other than ``auto``.
    """
    if device_map is None:
        return None
    if device_map != "auto":
        raise BadInputError(f"--device-map {device_map!r} is not supported; choose auto (or leave it out)")
    if not torch.cuda.is_available():
        raise BadInputError(f"--device-map auto spreads a model over GPUs; this machine has none "
                            f"(available: {', '.join(available_devices())}); leave --device-map out to run on the CPU")
    return device_map


def layer_devices(hf_model, n_layers: int) -> list[torch.device]:
    """The device of each decoder layer of a Hugging Face model (one device unless it was loaded with a
    device map; accelerate records the placement in ``hf_device_map``)."""
    default = next(hf_model.parameters()).device
    placement = getattr(hf_model, "hf_device_map", None) or {}
    devices = [default] * n_layers
    for name, where in placement.items():
        parts = name.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            if i + 1 < len(parts) and parts[i + 1].isdigit() and int(parts[i + 1]) < n_layers:
                devices[int(parts[i + 1])] = torch.device(where if not isinstance(where, int) else f"cuda:{where}")
    return devices
