"""The public API: ``__all__`` in pipeline order, every name importable, and a light import."""

from __future__ import annotations

import subprocess
import sys

import mechscope


def test_all_names_resolve():
    assert mechscope.__all__[0] == "CorpusConfig" and "attribute" in mechscope.__all__
    for name in mechscope.__all__:
        assert getattr(mechscope, name) is not None, name
    assert len(set(mechscope.__all__)) == len(mechscope.__all__)


def test_importing_mechscope_does_nothing():
    code = (
        "import sys, logging, mechscope\n"
        "heavy = [m for m in ('torch', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not logging.getLogger().handlers\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_graph_modules_do_not_import_models():
    code = (
        "import sys\n"
        "import mechscope.graph.io, mechscope.graph.prune, mechscope.export.neuronpedia\n"
        "bad = [m for m in ('transformers', 'mechscope.models', 'mechscope.attribution') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_import_layers():
    """Imports point one way (see DESIGN.md), checked by import-linter's contracts in .importlinter."""
    result = subprocess.run([sys.executable, "-m", "importlinter.cli", "--config", ".importlinter"],
                            capture_output=True, text=True, cwd=__file__.rsplit("/tests/", 1)[0])
    if "No module named" in result.stderr:
        result = subprocess.run(["lint-imports", "--config", ".importlinter"], capture_output=True, text=True,
                                cwd=__file__.rsplit("/tests/", 1)[0])
    assert result.returncode == 0, result.stdout + result.stderr
