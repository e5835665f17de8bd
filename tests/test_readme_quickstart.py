"""The README's Python quick start runs as written on the embedded model (marked slow; runs in CI)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from mechscope.transcoders.io import shipped_sets

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif("gemma-3-270m-plt-v1" not in shipped_sets(), reason="shipped set not installed")]


def test_the_python_quick_start_runs(capsys):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"<!-- quickstart -->\s*```python\n(.*?)```\s*<!-- /quickstart -->", readme, re.S)
    assert block, "the README lost its quick-start block"
    import torch

    torch.set_num_threads(2)
    exec(compile(block[1], "README.md quickstart", "exec"), {})
    out = capsys.readouterr().out
    assert "Graph('Fact: Michael Jordan plays the sport of'" in out and "' basketball' 0.611" in out
    assert out.count("total effect on ' basketball'") == 5
    assert "logit change of ' basketball' (intervened - clean):" in out
