"""KID: Kernel Inception Distance (Binkowski et al. 2018, "Demystifying MMD GANs", Sec. 4 and Eq. 4).

The unbiased MMD^2 with the cubic polynomial kernel ``k(x, y) = (x . y / d + 1)^3`` on Inception features,
averaged over random subsets, as clean-fid's ``kernel_distance`` computes it (defaults 100 subsets of at
most 1000 samples). Unlike FID it needs the features themselves, not their mean and covariance, so both
sides must be images (folders, tensors or generators), never ``.npz`` statistics.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from distill.metrics._util import check_int
from distill.metrics.finite import require_finite
from distill.metrics.fid import FeatureExtractor, check_run_options, feature_batches, prepare_extractor
from distill.metrics.sources import ValueRange, open_source
from distill.metrics.stats import Stats
from distill.models.errors import ToolkitError


def kernel_distance(features_a, features_b, num_subsets: int = 100, max_subset_size: int = 1000,
                    seed: int = 0) -> float:
    """Unbiased polynomial-kernel MMD^2 between two feature sets ``[N, D]``, ``[M, D]``, averaged over subsets.

    Each subset draws ``m = min(N, M, max_subset_size)`` rows of each side without replacement (with
    ``m = N = M`` the value does not depend on the draw). Computed in float64. It can be slightly negative.
    """
    a = torch.as_tensor(features_a).double()
    b = torch.as_tensor(features_b).double()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ToolkitError(f"KID needs two [N, D] feature sets of the same D, got {tuple(a.shape)} and {tuple(b.shape)}")
    check_int(num_subsets, "num_subsets", 1)
    check_int(max_subset_size, "max_subset_size", 2)
    require_finite(a, "feature vectors (first set)")
    require_finite(b, "feature vectors (second set)")
    m = min(a.shape[0], b.shape[0], max_subset_size)
    if m < 2:
        raise ToolkitError("KID needs at least 2 samples on each side")
    d = a.shape[1]
    generator = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(num_subsets):
        x = b[torch.randperm(b.shape[0], generator=generator)[:m]]
        y = a[torch.randperm(a.shape[0], generator=generator)[:m]]
        within = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        across = (x @ y.T / d + 1) ** 3
        total += float((within.sum() - within.diagonal().sum()) / (m - 1) - across.sum() * 2 / m)
    return total / num_subsets / m


def kid(
    a,
    b,
    *,
    extractor: FeatureExtractor | None = None,
    inception_path: str | os.PathLike | None = None,
    num_samples: int | None = None,
    value_range: ValueRange | None = None,
    truncate: bool = False,
    num_subsets: int = 100,
    max_subset_size: int = 1000,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """KID between two image sources (folders, tensors, generator callables), clean-fid's ``clean`` protocol.

    Arguments as in :func:`metrics.fid.fid`, plus ``num_subsets`` and ``max_subset_size`` (clean-fid's
    defaults). Features are gathered from every process, so all processes return the same value.
    """
    check_int(num_subsets, "num_subsets", 1)
    check_int(max_subset_size, "max_subset_size", 2)
    features = gathered_features([a, b], extractor=extractor, inception_path=inception_path, num_samples=num_samples,
                                 value_range=value_range, truncate=truncate, batch_size=batch_size,
                                 num_workers=num_workers, device=device, progress=progress, metric="KID")
    return kernel_distance(features[0], features[1], num_subsets, max_subset_size)


def gathered_features(inputs: list, *, extractor=None, inception_path=None, num_samples=None, value_range=None,
                      truncate: bool = False, batch_size: int = 64, num_workers: int | None = None, device=None,
                      progress: bool = True, metric: str = "this metric") -> list[torch.Tensor]:
    """Features ``[N, D]`` (CPU) of each image source, from all processes: for metrics that need features,
    not statistics (KID, precision/recall). Every input is opened and checked before the network loads."""
    check_run_options(batch_size, num_workers, num_samples)
    sources = [open_source(x, num_samples=num_samples, value_range=value_range, truncate=truncate) for x in inputs]
    for source in sources:
        if isinstance(source, Stats):
            raise ToolkitError(f"{metric} needs images, not statistics: {source.origin} holds only a mean and covariance")
    feature = prepare_extractor(extractor, inception_path, device)
    return [_gathered(torch.cat(list(feature_batches(s, feature, batch_size, num_workers, progress))).cpu())
            for s in sources]


def _gathered(features: torch.Tensor) -> torch.Tensor:
    """Every process's features, concatenated, on every process (unchanged without a process group)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, features)
    return torch.cat(shares)
