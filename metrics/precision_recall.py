"""Improved precision and recall (Kynkaanniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", Sec. 3, k = 3).

Each feature set approximates its manifold by the union of balls around its samples, each ball's
radius being the distance to the sample's k-th nearest neighbour in the same set. Precision: the
fraction of generated samples inside the reference manifold; recall: the fraction of reference
samples inside the generated manifold. A point on a ball's boundary counts as inside (``<=``), as in
the authors' code and torch-fidelity's ``metric_prc``, whose values these equal on the same features.
Distances are float64 and computed in row blocks, so memory stays ``block x N``.
"""
from __future__ import annotations

import os

import torch

from distill.metrics._util import check_int
from distill.metrics.finite import require_finite
from distill.metrics.kid import gathered_features
from distill.models.errors import ToolkitError

DEFAULT_K = 3


def knn_radii(features: torch.Tensor, k: int = DEFAULT_K, block: int = 4096) -> torch.Tensor:
    """Distance of every row to its k-th nearest other row (the row itself, at distance 0, is not counted)."""
    radii = [torch.cdist(chunk, features).kthvalue(k + 1, dim=1).values for chunk in features.split(block)]
    return torch.cat(radii)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, block: int) -> float:
    """Fraction of ``queries`` within ``radii[j]`` of some ``centres[j]``."""
    inside = [(torch.cdist(chunk, centres) <= radii).any(dim=1) for chunk in queries.split(block)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real, fake, k: int = DEFAULT_K, block: int = 4096) -> tuple[float, float]:
    """``(precision, recall)`` of generated features ``fake [M, D]`` against reference features ``real [N, D]``.

    Needs more than ``k`` samples on each side. (The same signature as the digits metric's helper.)
    """
    check_int(k, "k", 1)
    check_int(block, "block", 1)
    ref = torch.as_tensor(real).detach().to(torch.float64)
    gen = torch.as_tensor(fake).detach().to(torch.float64)
    if gen.ndim != 2 or ref.ndim != 2 or gen.shape[1] != ref.shape[1]:
        raise ToolkitError(f"precision/recall need two [N, D] feature sets of the same D, got "
                           f"{tuple(ref.shape)} (reference) and {tuple(gen.shape)} (generated)")
    for x, what in ((gen, "generated"), (ref, "reference")):
        if x.shape[0] <= k:
            raise ToolkitError(f"precision/recall with k={k} need more than {k} {what} samples, got {x.shape[0]}")
        require_finite(x, f"{what} feature vectors")
    precision = _coverage(gen, ref, knn_radii(ref, k, block), block)
    recall = _coverage(ref, gen, knn_radii(gen, k, block), block)
    return precision, recall


def precision_recall_images(generated, reference, *, k: int = DEFAULT_K, extractor=None,
                            inception_path: str | os.PathLike | None = None, num_samples: int | None = None,
                            value_range=None, truncate: bool = False, batch_size: int = 64,
                            num_workers: int | None = None, device=None, progress: bool = True) -> dict[str, float]:
    """``{"precision", "recall"}`` between two image sources (folders, tensors, generators), on Inception
    features by default or on any extractor's (e.g. :func:`metrics.dinov2.load_dinov2`); arguments as
    in :func:`metrics.kid.kid`. Features are gathered from every process, so all get the same values.
    """
    check_int(k, "k", 1)
    features = gathered_features([generated, reference], extractor=extractor, inception_path=inception_path,
                                 num_samples=num_samples, value_range=value_range, truncate=truncate,
                                 batch_size=batch_size, num_workers=num_workers, device=device, progress=progress,
                                 metric="precision/recall")
    precision, recall = precision_recall(features[1], features[0], k)
    return {"precision": precision, "recall": recall}
