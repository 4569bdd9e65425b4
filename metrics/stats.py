"""Gaussian feature statistics for FID: streaming accumulation, `.npz` files, the Frechet distance.

FID (Heusel et al. 2017) is the Frechet distance between two Gaussians fitted to feature vectors:
``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``. Everything here is float64, as in clean-fid
(Parmar et al. 2022), whose ``.npz`` files (``mu``, ``sigma``) load here unchanged.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distill.metrics._util import first_line
from distill.metrics.finite import require_finite, require_finite_stats
from distill.models.errors import ToolkitError


@dataclass
class Stats:
    """Mean and covariance of a feature set, the sample count and a manifest saying how they were made.

    The manifest (source, count, transform, extractor, weights hash, ...) travels inside the ``.npz``
    as a JSON string, so a statistics file is one self-describing file.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    manifest: dict = field(default_factory=dict)
    origin: str = field(default="statistics", compare=False)  # where it was read from, for messages

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.suffix != ".npz":
            path = path.with_name(path.name + ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            path,
            mu=self.mu,
            sigma=self.sigma,
            n=np.int64(-1 if self.n is None else self.n),
            manifest=np.array(json.dumps(self.manifest, sort_keys=True)),
        )
        return path

    @classmethod
    def load(cls, path: str | Path, expected_dim: int | None = None) -> "Stats":
        """Read statistics written by :meth:`save` or by clean-fid (``mu``, ``sigma`` only)."""
        path = Path(path)
        if not path.is_file():
            raise ToolkitError(f"statistics file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
        except Exception as err:  # zip or format errors: say which file, not numpy's internals
            raise ToolkitError(f"cannot read statistics file {path}: {first_line(err)}") from None
        if "mu" not in arrays or "sigma" not in arrays:
            raise ToolkitError(f"{path} holds no FID statistics: expected arrays 'mu' and 'sigma', found {sorted(arrays)}")
        stats = cls.from_arrays(arrays["mu"], arrays["sigma"], where=str(path))
        stats.origin = str(path)
        n = int(arrays["n"]) if "n" in arrays else -1
        stats.n = None if n < 0 else n
        if "manifest" in arrays:
            stats.manifest = json.loads(str(arrays["manifest"]))
        if expected_dim is not None and stats.dim != expected_dim:
            raise ToolkitError(
                f"{path} holds {stats.dim}-d statistics but the feature extractor gives {expected_dim}-d features"
            )
        warn_if_rank_deficient(stats)
        return stats

    @classmethod
    def from_arrays(cls, mu, sigma, where: str = "statistics") -> "Stats":
        mu = np.asarray(_to_numpy(mu), dtype=np.float64)
        sigma = np.asarray(_to_numpy(sigma), dtype=np.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ToolkitError(f"{where}: mu has shape {mu.shape} and sigma {sigma.shape}; expected [D] and [D, D]")
        require_finite_stats(mu, sigma, where)
        return cls(mu=mu, sigma=sigma)


class RunningStats:
    """Streaming float64 sum and ``X^T X`` of feature rows, all-reduced across processes.

    Keeping the sums instead of the features makes memory independent of the sample count and the
    multi-process result the exact sum of the per-process parts. ``(X^T X - n mu mu^T) / (n - 1)``
    loses about ``|mu|^2 / var`` of float64's 16 digits to cancellation, harmless for Inception
    features (mean and spread of the same order).
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.n = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def update(self, features: torch.Tensor) -> None:
        x = features.to(self.device, torch.float64).reshape(features.shape[0], -1)
        require_finite(x, "feature vectors", "the feature extractor gave NaN or inf for finite images")
        if self.total is None:
            self.total = torch.zeros(x.shape[1], dtype=torch.float64, device=self.device)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=self.device)
        elif x.shape[1] != self.total.shape[0]:
            raise ToolkitError(f"feature extractor changed its output size from {self.total.shape[0]} to {x.shape[1]}")
        self.n += x.shape[0]
        self.total += x.sum(dim=0)
        self.gram.addmm_(x.T, x)

    def all_reduce(self) -> None:
        """Sum the parts of all processes (no-op without an initialised process group)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        if self.total is None:
            raise ToolkitError("a process saw no samples; use at least as many samples as processes")
        n = torch.tensor([self.n], dtype=torch.float64, device=self.device)
        for tensor in (n, self.total, self.gram):
            dist.all_reduce(tensor)
        self.n = int(n.item())

    def finalize(self, manifest: dict | None = None) -> Stats:
        if self.total is None or self.n < 2:
            raise ToolkitError(f"FID statistics need at least 2 samples, got {self.n}")
        mu = self.total / self.n
        sigma = (self.gram - self.n * torch.outer(mu, mu)) / (self.n - 1)
        sigma = (sigma + sigma.T) / 2
        stats = Stats(mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=self.n, manifest=dict(manifest or {}))
        warn_if_rank_deficient(stats)
        return stats


def warn_if_rank_deficient(stats: Stats) -> None:
    if stats.n is not None and stats.n <= stats.dim:
        warnings.warn(
            f"only {stats.n} samples for {stats.dim}-d features: the covariance is rank-deficient and FID is "
            "biased and not comparable to published numbers (use more samples than feature dimensions)",
            UserWarning,
            stacklevel=3,
        )


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017), in float64.

    ``Tr((S1 S2)^(1/2))`` is computed in the symmetric form ``sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``:
    the same eigenvalues as ``S1 S2`` but of a symmetric PSD matrix, so two ``eigh`` calls replace
    scipy's ``sqrtm`` (which clean-fid uses), with no complex parts and no failure on singular
    covariances. With ``S1 = V L V^T`` and ``W = V L^(1/2)``, ``S1^(1/2) S2 S1^(1/2) = V (W^T S2 W) V^T``,
    so the eigenvalues of ``W^T S2 W`` are used (two matrix products instead of three). Tiny
    negative eigenvalues from rounding are clamped at 0. Runs on the CPU with torch's LAPACK, so
    ``torch.set_num_threads`` governs it. Accepts numpy arrays or tensors.
    """
    mu1, mu2 = (torch.atleast_1d(_as_float64(m)) for m in (mu1, mu2))
    sigma1, sigma2 = (torch.atleast_2d(_as_float64(s)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    for i, (mu, sigma) in enumerate(((mu1, sigma1), (mu2, sigma2)), start=1):
        require_finite_stats(mu.numpy(), sigma.numpy(), f"statistics {i}")
    if mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ToolkitError(
            f"statistics do not match: mu {tuple(mu1.shape)} vs {tuple(mu2.shape)}, "
            f"sigma {tuple(sigma1.shape)} vs {tuple(sigma2.shape)}"
        )
    eigvals, eigvecs = torch.linalg.eigh(sigma1)
    w = eigvecs * eigvals.clamp(min=0).sqrt()
    product = w.T @ sigma2 @ w
    trace_covmean = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0).sqrt().sum()
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * trace_covmean)


def _as_float64(x) -> torch.Tensor:
    return torch.as_tensor(x).detach().to("cpu", torch.float64)


def _to_numpy(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
