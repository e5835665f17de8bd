"""Pretrained transcoder sets from the Hugging Face hub, through ``huggingface_hub`` (only the files a set
needs are fetched; they are cached in the hub cache, ``HF_HUB_CACHE``; ``HF_HUB_OFFLINE=1`` is honoured).

A hub reference is ``[hf://]ORG/REPO[//SUBFOLDER | /SUBFOLDER][@REVISION]`` and names one of:

- **circuit-tracer** (``config.yaml`` at the top of the reference, ``model_kind: transcoder_set`` or
  ``cross_layer_transcoder``): per-layer sets whose ``transcoders:`` list holds ``hf://`` URIs of the
  layer files (e.g. ``mwhanna/qwen3-0.6b-transcoders-lowl0``), or ``layer_{i}.safetensors`` beside it;
  CLTs with ``W_enc_{i}`` / ``W_dec_{i}`` files beside it (``mntss/clt-gemma-2-2b-426k``);
- **Gemma Scope 2** (``google/gemma-scope-2-<size>-<pt|it>//<subfolder>``): a subfolder holding one
  ``layer_*/params.safetensors`` per layer, or a CLT's ``params_layer_{L}.safetensors``;
- **sparsify / EleutherAI** (``EleutherAI/...``): one folder per hookpoint, ``layers.{i}.mlp/cfg.json``
  and ``sae.safetensors`` (TopK transcoders trained with ``--transcode``; the hookpoint is the MLP
  module, whose input and output are mechscope's sites for every architecture without a post-MLP
  norm).

:func:`fetch_transcoders` returns a local directory the loaders of :mod:`mechscope.transcoders.io`
read; files named by ``hf://`` URIs inside a ``config.yaml`` are fetched by :func:`download_uri`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

from mechscope.errors import BadInputError

__all__ = ["HubRef", "looks_like_hub_id", "parse_hub_ref", "fetch_transcoders", "download_uri"]

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]*"
_REF = re.compile(rf"^(?:hf://)?(?P<repo>{_PART}/{_PART})(?://?(?P<sub>[^@]+?))?/?(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")


@dataclass(frozen=True)
class HubRef:
    """A parsed hub reference: ``repo_id``, optional ``subfolder`` and ``revision``."""

    repo_id: str
    subfolder: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"//{self.subfolder}" if self.subfolder else "") + (f"@{self.revision}" if self.revision else "")

    def path_in_repo(self, name: str) -> str:
        return f"{self.subfolder}/{name}" if self.subfolder else name


def looks_like_hub_id(name: str) -> bool:
    """Whether ``name`` reads as a hub reference (and is not a local path)."""
    if name.startswith("hf://"):
        return True
    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    return _REF.match(name) is not None


def parse_hub_ref(name: str) -> HubRef:
    """``[hf://]ORG/REPO[//SUB | /SUB][@REV]`` as a :class:`HubRef`.

    Raises:
        BadInputError: not of that form.
    """
    match = _REF.match(name.strip())
    if not match:
        raise BadInputError(f"{name!r} is not a hub reference; write ORG/REPO, ORG/REPO//SUBFOLDER or "
                            "hf://ORG/REPO/SUBFOLDER, optionally with @REVISION")
    sub = match["sub"].strip("/") if match["sub"] else None
    return HubRef(match["repo"], sub or None, match["rev"])


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _missing(ref: HubRef, file: str, error: Exception) -> BadInputError:
    where = f"{ref.repo_id}/{file}" + (f"@{ref.revision}" if ref.revision else "")
    if _offline():
        return BadInputError(
            f"{where} is not in the Hugging Face cache ({_cache_dir()}) and the hub is offline (HF_HUB_OFFLINE=1); "
            f"fetch it where there is a network (`hf download {ref.repo_id} {file}`) or unset HF_HUB_OFFLINE")
    return BadInputError(f"cannot fetch {where} from the Hugging Face hub: {error}")


def download_file(ref: HubRef, name: str) -> Path:
    """One file of the reference (relative to its subfolder), from the cache or the hub.

    Raises:
        BadInputError: not cached while offline, or not on the hub (names the cache and the file).
    """
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    file = ref.path_in_repo(name)
    try:
        return _downloaded(ref.repo_id, file, ref.revision, _cache_dir())
    except (LocalEntryNotFoundError, EntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError) as e:
        raise _missing(ref, file, e) from e


@functools.lru_cache(maxsize=4096)
def _downloaded(repo_id: str, file: str, revision: str | None, cache_dir: str) -> Path:
    """``hf_hub_download``, once per process for each file: a set is resolved early (to fail before
    the model loads) and again when loaded, and each call would ask the hub again (failures are not
    remembered, so a retry asks again)."""
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, file, revision=revision, cache_dir=cache_dir))


def download_uri(uri: str) -> Path:
    """The local copy of ``hf://ORG/REPO/PATH[?revision=REV]`` (circuit-tracer's ``transcoders:`` entries).

    Raises:
        BadInputError: a malformed URI, or a file neither cached nor reachable.
    """
    from urllib.parse import parse_qs, urlparse

    parsed = urlparse(uri)
    parts = parsed.path.lstrip("/").split("/", 1)
    if parsed.scheme != "hf" or not parsed.netloc or len(parts) != 2 or not parts[1]:
        raise BadInputError(f"{uri!r} is not an hf://ORG/REPO/PATH URI")
    revision = (parse_qs(parsed.query).get("revision") or [None])[0]
    return download_file(HubRef(f"{parsed.netloc}/{parts[0]}", None, revision), parts[1])


def _snapshot(ref: HubRef, patterns: list[str]) -> Path | None:
    """The cached snapshot holding the files matching ``patterns`` (fetched unless offline), or ``None``
    when the repository or revision is not there."""
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        root = _snapshot_downloaded(ref.repo_id, ref.revision, tuple(patterns), _cache_dir())
    except (LocalEntryNotFoundError, RepositoryNotFoundError, HfHubHTTPError, OSError):
        return None
    return root / ref.subfolder if ref.subfolder else root


@functools.lru_cache(maxsize=256)
def _snapshot_downloaded(repo_id: str, revision: str | None, patterns: tuple[str, ...], cache_dir: str) -> Path:
    """``snapshot_download``, once per process for each set (see :func:`_downloaded`)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns), cache_dir=cache_dir))


def fetch_transcoders(name: str) -> Path:
    """A local directory holding the set ``name`` names on the hub (see the module docstring).

    Raises:
        BadInputError: a malformed reference; a set neither cached nor reachable (offline: names the
            cache directory and the file looked for); a reference that holds none of the layouts.
    """
    ref = parse_hub_ref(name)
    try:
        config = download_file(ref, "config.yaml")
    except BadInputError as missing_config:
        config, error = None, missing_config
    if config is not None:
        return _fetch_circuit_tracer(ref, config)
    patterns = [ref.path_in_repo(p) for p in ("layer_*/params.safetensors", "layer_*/config.json",
                                             "params_layer_*.safetensors", "*/cfg.json", "*/sae.safetensors")]
    local = _snapshot(ref, patterns)
    if local is not None and local.is_dir():
        from mechscope.transcoders.io import _is_gemma_scope_2
        from mechscope.transcoders.clt_io import is_gemma_scope_2_clt
        from mechscope.transcoders.sparsify import is_sparsify_dir

        if _is_gemma_scope_2(local) or is_gemma_scope_2_clt(local) or is_sparsify_dir(local):
            return local
    if _offline() or local is None:
        raise error
    raise BadInputError(f"{ref} holds no transcoder set mechscope reads (looked for config.yaml, Gemma Scope 2 "
                        "layer_*/params.safetensors or params_layer_*.safetensors, sparsify */cfg.json); "
                        "name the subfolder that holds one, as ORG/REPO//SUBFOLDER")


def _fetch_circuit_tracer(ref: HubRef, config_file: Path) -> Path:
    import yaml

    config = yaml.safe_load(config_file.read_text()) or {}
    kind = config.get("model_kind", "transcoder_set")
    if kind == "cross_layer_transcoder":
        patterns = [ref.path_in_repo("*.safetensors")]
    elif config.get("transcoders"):
        for uri in config["transcoders"]:  # fetched now, so that a missing layer fails before any work
            if str(uri).startswith("hf://"):
                download_uri(str(uri))
        return config_file.parent
    else:
        patterns = [ref.path_in_repo("layer_*.safetensors")]
    local = _snapshot(ref, patterns)
    if local is None:
        raise _missing(ref, patterns[0], OSError("not cached"))
    return config_file.parent
