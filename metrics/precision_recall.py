"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 2): each set's manifold is the union of balls around its features whose
radius is the distance to the k-th nearest neighbour in the same set (k = 3 in the paper). Precision is the
fraction of generated samples inside the real manifold; recall the fraction of real samples inside the
generated manifold. Exact pairwise distances (fine up to a few 10k samples on a CPU).
"""
from __future__ import annotations

import torch


def _kth_radius(x: torch.Tensor, k: int, chunk: int = 2048) -> torch.Tensor:
    """Distance from each row of ``x`` to its k-th nearest other row."""
    radii = []
    for i in range(0, len(x), chunk):
        d = torch.cdist(x[i:i + chunk], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # k + 1: the point itself is at distance 0
    return torch.cat(radii)


def _inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    out = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """``(precision, recall)`` of feature sets ``real [N, D]`` and ``fake [M, D]`` (k-NN manifolds, k = 3)."""
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set")
    real, fake = real.double(), fake.double()
    precision = _inside(fake, real, _kth_radius(real, k)).double().mean().item()
    recall = _inside(real, fake, _kth_radius(fake, k)).double().mean().item()
    return precision, recall
