"""Small helpers shared by the metrics modules."""
from __future__ import annotations

import os

import torch


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
