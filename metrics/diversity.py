"""Diversity: mean pairwise feature distance between images of the same prompt made from different seeds.

Mode collapse (DMD's known failure, and the reason DMD2 adds a GAN term) shows as images of one prompt
that look alike whatever the seed; FID over many prompts can miss it. This score takes the features
of each prompt's images (DINOv2, CLIP or Inception), averages the distances over all pairs within the
prompt, then averages over prompts. ``cosine`` distance (``1 - cos``, 0 for identical directions) is
scale-free, so values compare across extractors of one kind; ``l2`` is the Euclidean distance.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch

from distill.metrics.finite import require_finite
from distill.models.errors import ToolkitError

DISTANCES = ("cosine", "l2")


def diversity(features, groups: Sequence, distance: str = "cosine") -> float:
    """Mean over groups (prompts) of the mean pairwise distance between the group's feature rows.

    Args:
        features: ``[N, D]`` features of N images.
        groups: ``N`` group keys (e.g. the prompt or its index); groups with one image are skipped.
        distance: ``"cosine"`` (``1 - cos``) or ``"l2"``.
    """
    if distance not in DISTANCES:
        raise ToolkitError(f"unknown diversity distance {distance!r}; choose {' or '.join(DISTANCES)}")
    x = torch.as_tensor(features).detach().to(torch.float64)
    if x.ndim != 2 or x.shape[0] != len(groups):
        raise ToolkitError(f"diversity needs features [N, D] and N group keys, got {tuple(x.shape)} and {len(groups)}")
    require_finite(x, "feature vectors")
    members: dict = defaultdict(list)
    for i, key in enumerate(groups):
        members[key].append(i)
    scores = []
    for rows in members.values():
        if len(rows) < 2:
            continue
        g = x[rows]
        if distance == "cosine":
            g = torch.nn.functional.normalize(g, dim=1)
            d = 1 - g @ g.T
        else:
            d = torch.cdist(g, g)
        n = len(rows)
        scores.append(float((d.sum() - d.diagonal().sum()) / (n * (n - 1))))
    if not scores:
        raise ToolkitError("diversity needs at least 2 images of one prompt (several seeds per prompt: use --n "
                           "of at least twice the number of prompts)")
    return sum(scores) / len(scores)
