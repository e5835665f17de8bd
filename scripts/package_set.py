"""Make a trained transcoder set a package of its own under ``sets/<name>/`` (issue "shipped sets are their
own distributions"): ``pyproject.toml`` with the ``mechscope.transcoder_sets`` entry point, the package
``mechscope_set_<name>`` holding the set's files under ``files/``, and a README with the set's held-out
figures from its ``config.yaml``. The wheel must stay within PyPI's 100 MiB: the files are deflated once
here to check (safetensors of bfloat16 weights compress little).

    .venv/bin/python scripts/package_set.py qwen2.5-coder-0.5b-instruct-plt-v1 \\
        ~/.cache/mechscope/transcoders/qwen2.5-coder-0.5b-instruct-plt-v1 --description "..."
    .venv/bin/pip install --no-deps -e sets/qwen2.5-coder-0.5b-instruct-plt-v1   # scripts/setup.sh does this

Exit 2 with one line (nothing written) for a set directory without ``config.yaml``, a package that
exists already, or files that would not fit a 100 MiB wheel.
"""

from __future__ import annotations

import argparse
import io
import re
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
#: PyPI's limit for one file: warehouse/constants.py, MAX_FILESIZE = 100 * ONE_MIB (104,857,600 bytes)
WHEEL_LIMIT = 100 * 1024**2

PYPROJECT = '''[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "{description}"
readme = "README.md"
requires-python = ">=3.11"
license = {{ text = "{license}" }}

# mechscope finds the set by this entry point: name = the set's name, value = the package holding files/
[project.entry-points."mechscope.transcoder_sets"]
"{name}" = "{package}"

[tool.setuptools.packages.find]
where = ["src"]

[tool.setuptools.package-data]
{package} = ["files/*"]
'''


def names(set_name: str) -> tuple[str, str]:
    """``(distribution name, package name)`` of a set: ``mechscope-set-<name>``, ``mechscope_set_<name>``."""
    slug = re.sub(r"[^a-z0-9]+", "-", set_name.lower()).strip("-")
    return f"mechscope-set-{slug}", f"mechscope_set_{slug.replace('-', '_')}"


def deflated_size(files: list[Path]) -> int:
    """Bytes of a zip (wheels are zips) holding ``files``, deflated."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, file.name)
    return buffer.tell()


def figures(config: dict) -> str:
    """A Markdown table of the held-out figures recorded in a set's ``config.yaml`` (none: a note)."""
    rows = config.get("heldout_metrics") or []
    if not rows:
        return "No held-out figures are recorded in its config.yaml.\n"
    lines = ["| layer | FVU | L0 | dead |", "|---|---|---|---|"]
    lines += [f"| {m['layer']} | {m['fvu']:.3f} | {m['l0']:.1f} | {m['dead_fraction']:.3f} |" for m in rows]
    return "\n".join(lines) + "\n"


def package(set_name: str, source: Path, sets_root: Path, description: str, version: str = "1.0.0",
            license: str = "Apache-2.0") -> Path:
    """Write ``sets_root/<set_name>/`` (atomically: built in a temporary folder, then renamed).

    Raises:
        SystemExit(2): no ``config.yaml`` in ``source``, the package exists, or the files exceed a
            100 MiB wheel.
    """
    config_file = source / "config.yaml"
    if not config_file.is_file():
        raise SystemExit(f"error: {source} holds no config.yaml; give the directory `mechscope train` wrote")
    target = sets_root / set_name
    if target.exists():
        raise SystemExit(f"error: {target} exists already; remove it or choose another set name")
    files = sorted(p for p in source.iterdir() if p.is_file())
    size = deflated_size(files)
    if size > WHEEL_LIMIT:
        raise SystemExit(f"error: the files of {set_name} deflate to {size / 2**20:.1f} MiB, over the 100 MiB a PyPI "
                         "wheel may hold; store them in bfloat16 or train a narrower set")
    dist, package_name = names(set_name)
    config = yaml.safe_load(config_file.read_text()) or {}
    sets_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=sets_root) as tmp:
        root = Path(tmp) / set_name
        files_dir = root / "src" / package_name / "files"
        files_dir.mkdir(parents=True)
        for file in files:
            shutil.copy2(file, files_dir / file.name)
        (root / "src" / package_name / "__init__.py").write_text(
            f'"""The mechscope transcoder set ``{set_name}``: its files are in ``files/`` beside this module\n'
            '(circuit-tracer\'s layout). Importing it does nothing."""\n')
        (root / "pyproject.toml").write_text(PYPROJECT.format(dist=dist, version=version, description=description,
                                                              license=license, name=set_name, package=package_name))
        (root / "README.md").write_text(
            f"# {set_name}\n\n{description}\n\nA mechscope transcoder set (model `{config.get('model_name', '?')}`), "
            f"installed with `pip install ./sets/{set_name}`; mechscope finds it by name through the entry point "
            f"group `mechscope.transcoder_sets`. Wheel: {size / 2**20:.1f} MiB.\n\n## Held-out figures\n\n"
            + figures(config))
        root.rename(target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name")
    parser.add_argument("source", type=Path)
    parser.add_argument("--description", required=True)
    parser.add_argument("--version", default="1.0.0")
    parser.add_argument("--sets-root", type=Path, default=ROOT / "sets")
    args = parser.parse_args(argv)
    try:
        target = package(args.name, args.source.expanduser(), args.sets_root, args.description, args.version)
    except SystemExit as e:
        print(e, file=sys.stderr)
        raise SystemExit(2) from None
    print(f"wrote {target}; install it with: .venv/bin/pip install --no-deps -e {target}")


if __name__ == "__main__":
    main()
