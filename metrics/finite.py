"""Non-finite checks: NaN or inf in images, latents, features or statistics is an error, never a number.

A NaN pixel quantised to uint8 silently becomes 0 (``torch.clamp`` keeps NaN, the cast maps it to 0),
and a NaN in a covariance ends in a LAPACK traceback; both are caught here with a count of the samples
affected, so the message says how bad it is (one sample of 10k, or all of them).
"""
from __future__ import annotations

import numpy as np
import torch

from distill.models.errors import ToolkitError


def nonfinite_rows(x: torch.Tensor | np.ndarray) -> int:
    """How many samples (rows along dim 0) hold at least one NaN or inf; 0 for integer data."""
    t = torch.as_tensor(x)
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return 0
    bad = ~torch.isfinite(t.reshape(t.shape[0], -1) if t.ndim > 1 else t.reshape(-1, 1))
    return int(bad.any(dim=1).sum().item())


def require_finite(x: torch.Tensor | np.ndarray, what: str, hint: str = "") -> None:
    """Raise :class:`ToolkitError` ``"<k> of <n> <what> contain NaN or inf"`` when any sample is non-finite.

    Args:
        x: a batch ``[N, ...]`` (a 1-d array counts each entry as a sample).
        what: plural noun for the samples, e.g. ``"generated images"``, ``"latents"``.
        hint: appended after a semicolon (what to check or do).
    """
    count = nonfinite_rows(x)
    if count:
        total = int(torch.as_tensor(x).shape[0]) if torch.as_tensor(x).ndim else 1
        raise ToolkitError(f"{count} of {total} {what} contain NaN or inf" + (f"; {hint}" if hint else ""))


def require_finite_stats(mu, sigma, where: str) -> None:
    """Mean ``[D]`` and covariance ``[D, D]`` must be finite: say how many entries are not, and where."""
    mu_bad = int((~np.isfinite(np.asarray(mu))).sum())
    sigma_bad = int((~np.isfinite(np.asarray(sigma))).sum())
    if mu_bad or sigma_bad:
        d = int(np.asarray(mu).shape[0]) if np.asarray(mu).ndim else 1
        raise ToolkitError(
            f"{where}: {mu_bad} of {d} mean entries and {sigma_bad} of {d * d} covariance entries are NaN or inf; "
            "the statistics are unusable (recompute them from finite images)"
        )
