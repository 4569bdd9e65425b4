"""Checks of command-line options, run before any slow work (model lookup, loading, training).

Each raises :class:`~distill.models.errors.ToolkitError` with one line naming the option, the value and what
is allowed; ``distill`` prints it as ``error: ...`` and exits with code 2. Any command can reuse them.
"""
from __future__ import annotations

import os
from pathlib import Path

from distill.models.errors import ToolkitError


def at_least(option: str, value: int | float | None, lo: int | float) -> None:
    """``value >= lo`` (None: the option was not given, nothing to check)."""
    if value is not None and not value >= lo:
        raise ToolkitError(f"{option} {value} is out of range: expected a value >= {lo}")


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _creatable(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder this process can write into."""
    ancestor = _nearest_existing(path.parent if not path.exists() else path)
    if not ancestor.is_dir():
        raise ToolkitError(f"{option} {path}: {ancestor} is a file, so the path cannot be created")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ToolkitError(f"{option} {path}: no permission to write in {ancestor}")


def out_dir(path: str | Path, option: str = "--out") -> Path:
    """An output folder: an existing folder, or a path whose folders can be created; not a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ToolkitError(f"{option} {path} is a file; expected a folder (or a path where one can be created)")
    _creatable(path, option)
    return path


def out_file(path: str | Path, option: str = "--out") -> Path:
    """An output file: not an existing folder, in a folder that exists or can be created."""
    path = Path(path)
    if path.is_dir():
        raise ToolkitError(f"{option} {path} is a folder; expected a file path")
    _creatable(path, option)
    return path


def existing(path: str | Path, option: str, kind: str = "path") -> Path:
    """An input that must exist (``kind``: ``path``, ``file`` or ``folder``)."""
    path = Path(path)
    ok = path.is_file() if kind == "file" else path.is_dir() if kind == "folder" else path.exists()
    if not ok:
        raise ToolkitError(f"{option} {path}: no such {kind}")
    return path


def device(name: str | None, option: str = "--device") -> str | None:
    """A torch device that exists here: ``cpu``, ``cuda``/``cuda:N`` (N < the visible GPU count), ``mps``."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ToolkitError(f"{option} {name!r} is not a device name (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ToolkitError(f"{option} {name}: no CUDA device is available on this machine (use cpu)")
        if dev.index is not None and dev.index >= count:
            raise ToolkitError(f"{option} {name}: only {count} CUDA device(s) visible (cuda:0..cuda:{count - 1})")
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ToolkitError(f"{option} {name}: MPS is not available on this machine (use cpu)")
    elif dev.type != "cpu":
        raise ToolkitError(f"{option} {name!r}: unsupported device type {dev.type} (cpu, cuda, cuda:N, mps)")
    return name
