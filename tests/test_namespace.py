"""The toolkit's packages live under one namespace: a user's own ``models.py`` / ``metrics.py`` cannot shadow them.

The repository keeps ``models/`` and ``metrics/`` at the top level (the design card's layout); setuptools'
package-dir mapping installs them as ``distill.models`` and ``distill.metrics`` (pyproject.toml).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed():
    """A new sub-package (a folder with ``__init__.py``) must be listed in pyproject's packages, or it is not installed."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapping = setuptools["package-dir"]
    found = set()
    for top, installed in (("distill", "distill"), *((folder, name) for name, folder in mapping.items())):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((installed, *rel)))
    assert found == listed, f"not installed: {sorted(found - listed)}; listed but missing: {sorted(listed - found)}"


@pytest.fixture()
def shadowing_folder(tmp_path) -> Path:
    """A working folder with the user's own ``models.py`` and ``metrics.py`` (as ML projects often have)."""
    (tmp_path / "models.py").write_text("raise ImportError('the user models.py was imported')\n")
    (tmp_path / "metrics.py").write_text("raise ImportError('the user metrics.py was imported')\n")
    return tmp_path


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ""}  # as a user's shell: the repository is not on the path
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_imports_from_a_folder_with_user_modules(shadowing_folder):
    code = ("from distill.samplers import sample_student\n"
            "from distill.models.roles import Student\n"
            "from distill import metrics\n"
            "import distill.metrics.fid, distill.models.loading\n"
            "print(metrics.fid.__module__)\n")
    result = _run([sys.executable, "-c", code], shadowing_folder)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "distill.metrics.fid"


def test_readme_commands_from_a_folder_with_user_modules(shadowing_folder):
    """The README's main job, shortened, and sampling from its run, through ``python -m distill.cli``."""
    recipe = ROOT / "recipes" / "toy_ring8_dmd2.yaml"
    run = shadowing_folder / "run"
    train = _run([sys.executable, "-m", "distill.cli", "train", str(recipe), "--out", str(run), "--no-progress",
                  "train.steps=2", "student.warm_start.steps=2", "student.warm_start.pairs=8",
                  "data.batch_size=8", "train.sample_every=0"], shadowing_folder)
    assert train.returncode == 0, train.stderr[-2000:]
    sample = _run([sys.executable, "-m", "distill.cli", "sample", str(run), "--n", "4",
                   "--out", str(shadowing_folder / "s.npy")], shadowing_folder)
    assert sample.returncode == 0, sample.stderr[-2000:]
    assert (shadowing_folder / "s.npy").is_file()
