"""Releasing memory keeps every value: weight pages handed back to the kernel come back unchanged,
and atomic files are all or nothing."""

from __future__ import annotations

import sys

import pytest
import torch

from mechscope.memory import release_free_memory, release_pages
from mechscope.paths import atomic_file


def _rss_file_kb() -> int:
    """File-backed resident memory of this process (Linux ``/proc/self/status``)."""
    for line in open("/proc/self/status"):
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile line")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_PAGEOUT) is Linux-only")
def test_released_weight_pages_leave_rss_and_keep_their_values(tmp_path):
    """A private mapping of a weights file (how safetensors hands weights to Hugging Face): after
    :func:`release_pages` the pages are no longer resident and the values read back are the same."""
    path = tmp_path / "weights.bin"
    n = 16 * 2**20  # 64 MB of float32
    torch.randn(n, generator=torch.Generator().manual_seed(0)).numpy().tofile(path)
    weights = torch.from_file(str(path), shared=False, size=n)  # MAP_PRIVATE, like a loaded model
    checksum = float(weights.double().sum())  # touches every page
    before = _rss_file_kb()
    released = release_pages(weights)
    if released == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT")
    assert released >= weights.nbytes - 2 * 4096
    assert before - _rss_file_kb() > 0.5 * weights.nbytes / 1024
    assert float(weights.double().sum()) == checksum


def test_released_anonymous_pages_keep_their_values():
    """Pages of ordinary tensors (no file behind them) are never zeroed, swap or not."""
    tensor = torch.randn(4 * 2**20, generator=torch.Generator().manual_seed(1))
    reference = tensor.clone()
    release_pages(tensor)
    assert torch.equal(tensor, reference)
    assert release_pages(torch.ones(3)) == 0  # 12 bytes span no whole page
    assert isinstance(release_free_memory(), bool)


def test_atomic_file_is_all_or_nothing(tmp_path):
    path = tmp_path / "graph.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("writer failed")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["graph.safetensors"]
    with atomic_file(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["graph.safetensors"]
