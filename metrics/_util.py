"""Small helpers shared by the metrics modules."""
from __future__ import annotations

import os

import numpy as np
import torch

from distill.models.errors import ToolkitError


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, for one-line user errors."""
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0]


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """The given device, else CUDA when present, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_workers() -> int:
    """Image decoding processes when none are asked for."""
    return min(4, os.cpu_count() or 1)


def check_int(value, name: str, minimum: int, optional: bool = False) -> None:
    """``value`` must be an integer >= ``minimum`` (``None`` allowed when ``optional``); else a one-line error.

    Called at the top of every public metric function, so a bad option fails before any network loads.
    """
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ToolkitError(f"{name} must be an integer >= {minimum}, got {value!r}")
