"""Shipped transcoder sets are their own distributions, found through package metadata."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from conftest import random_set
from mechscope.errors import BadInputError, UnknownNameError
from mechscope.transcoders import io as tio
from mechscope.transcoders.io import KNOWN_SETS, install_line, load_transcoder_set, resolve_transcoders, save_transcoder_set

REPO = Path(__file__).resolve().parents[1]
WHEEL_LIMIT = 100 * 1024**2  # PyPI's limit for one file


def _fake_distribution(root: Path, set_name: str, module: str, transcoders) -> Path:
    """A distribution as pip installs it: the package with files/ and a dist-info with the entry point."""
    save_transcoder_set(transcoders, root / module / "files")
    (root / module / "__init__.py").write_text("")
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[mechscope.transcoder_sets]\n{set_name} = {module}\n")
    return root / module / "files"


def test_an_installed_set_package_is_found_by_its_entry_point(tmp_path, monkeypatch):
    tiny_transcoders = random_set()
    files = _fake_distribution(tmp_path, "tiny-plt-test", "mechscope_set_tiny_plt_test", tiny_transcoders)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "tiny-plt-test" in tio.shipped_sets()
    assert resolve_transcoders("tiny-plt-test") == files
    loaded = load_transcoder_set("tiny-plt-test")
    assert loaded.n_layers == tiny_transcoders.n_layers
    for layer in range(loaded.n_layers):
        assert (loaded[layer].W_dec == tiny_transcoders[layer].W_dec).all()
    assert "mechscope_set_tiny_plt_test" not in sys.modules  # found without importing it


def test_a_set_trained_here_resolves_by_its_name(tmp_path, monkeypatch):
    """`mechscope train --name my-set` saves to <cache>/transcoders/my-set; `--transcoders my-set` finds it."""
    monkeypatch.setenv("MECHSCOPE_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UnknownNameError):
        resolve_transcoders("my-set")
    save_transcoder_set(random_set(), tmp_path / "home" / "transcoders" / "my-set")
    assert resolve_transcoders("my-set") == tmp_path / "home" / "transcoders" / "my-set"
    (tmp_path / "my-set").mkdir()  # a directory of that name where the command runs is what it names
    save_transcoder_set(random_set(), tmp_path / "my-set")
    assert resolve_transcoders("my-set") == Path("my-set")


def test_a_known_set_that_is_not_installed_names_its_install_line(monkeypatch):
    monkeypatch.setattr(tio, "_installed_sets", lambda: {})
    for name in KNOWN_SETS:
        with pytest.raises(BadInputError) as info:
            resolve_transcoders(name)
        assert not isinstance(info.value, UnknownNameError)
        if name in tio.IN_TRAINING and not tio._repository_has(name):  # no package to install yet
            assert "not shipped yet" in str(info.value) and tio.IN_TRAINING[name] in str(info.value)
        else:
            assert f"pip install ./sets/{name}" in str(info.value) and install_line(name) in str(info.value)


def _package_set():
    """``scripts/package_set.py`` as a module."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("package_set", REPO / "scripts" / "package_set.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_set_in_the_repository_is_a_package_under_the_wheel_limit():
    set_dirs = sorted(p for p in (REPO / "sets").iterdir() if p.is_dir())
    assert set_dirs, "no set packages under sets/"
    for set_dir in set_dirs:
        name = set_dir.name
        assert name in KNOWN_SETS
        pyproject = (set_dir / "pyproject.toml").read_text()
        assert f'name = "{KNOWN_SETS[name]}"' in pyproject and '"mechscope.transcoder_sets"' in pyproject
        config_files = list(set_dir.glob("src/*/files/config.yaml"))
        assert len(config_files) == 1, f"{set_dir}: expected one src/<package>/files/config.yaml"
        files = config_files[0].parent
        assert yaml.safe_load(config_files[0].read_text())["scan"] == name
        # a wheel is a zip: what counts is the files deflated (bfloat16 weights deflate to about 80 %)
        size = _package_set().deflated_size(sorted(files.iterdir()))
        assert size <= WHEEL_LIMIT, f"{name}: its files deflate to {size / 1e6:.1f} MB, over one PyPI wheel"


def test_the_core_package_carries_no_weights():
    src = REPO / "src" / "mechscope"
    assert not list(src.rglob("*.safetensors"))
    assert not (src / "transcoders" / "shipped").exists()


def test_package_set_script_makes_a_wheel_that_holds_the_set(tmp_path):
    import subprocess
    import tomllib
    import zipfile

    package_set = _package_set()
    source = tmp_path / "trained"
    save_transcoder_set(random_set(), source, extra_config={"heldout_metrics": [
        {"layer": 0, "fvu": 0.1234, "l0": 12.5, "dead_fraction": 0.01, "n_tokens": 10}]})
    target = package_set.package("tiny-plt-v9", source, tmp_path / "sets", "A tiny test set.")
    project = tomllib.loads((target / "pyproject.toml").read_text())
    assert project["project"]["name"] == "mechscope-set-tiny-plt-v9"
    assert project["project"]["entry-points"]["mechscope.transcoder_sets"] == {"tiny-plt-v9": "mechscope_set_tiny_plt_v9"}
    assert "| 0 | 0.123 | 12.5 | 0.010 |" in (target / "README.md").read_text()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(tmp_path / "wheel"), str(target)], check=True, capture_output=True)
    wheel = next((tmp_path / "wheel").glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert {f"mechscope_set_tiny_plt_v9/files/{p.name}" for p in source.iterdir()} <= set(names)
    assert wheel.stat().st_size < WHEEL_LIMIT
    # nothing is overwritten, and a directory that is not a set is refused
    with pytest.raises(SystemExit, match="exists already"):
        package_set.package("tiny-plt-v9", source, tmp_path / "sets", "again")
    with pytest.raises(SystemExit, match="no config.yaml"):
        package_set.package("other", tmp_path, tmp_path / "sets", "x")
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["tiny-plt-v9"]
