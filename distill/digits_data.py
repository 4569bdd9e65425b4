"""The handwritten digits that ship with scikit-learn, as images for the digits teacher, its metric and the demo.

``sklearn.datasets.load_digits()`` is the UCI optical-recognition set (Alpaydin & Kaynak 1998): 1,797 images of
8x8 pixels, 17 grey levels (0..16), 10 classes, stored inside scikit-learn (no download). Images are returned
as float32 ``[N, 1, 8, 8]`` in ``[-1, 1]`` (``x / 8 - 1``), the range diffusion models are trained in.

The cache folder (teacher pipeline, classifier weights) is ``$DISTILL_CACHE`` or ``~/.cache/distill``.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from distill.models.errors import ToolkitError

NUM_CLASSES = 10
SIZE = 8  # native resolution; see distill/digits_teacher.py for why the teacher is trained at 8x8
HOLDOUT = 297  # the last 297 images: classifier test split (1500 train / 297 test)


def cache_root(folder: str | os.PathLike | None = None) -> Path:
    """``folder``, else ``$DISTILL_CACHE``, else ``~/.cache/distill`` (created)."""
    root = Path(folder or os.environ.get("DISTILL_CACHE") or Path.home() / ".cache" / "distill").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images ``[N, 1, 8, 8]`` float32 in [-1, 1] and labels ``[N]`` int64, in sklearn's order."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise ToolkitError("the digits need scikit-learn: pip install scikit-learn") from None
    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images, torch.as_tensor(data.target, dtype=torch.long)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] model outputs -> [0, 1] for plots (clamped)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).cpu()
