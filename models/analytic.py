"""Analytic teachers: isotropic Gaussian mixtures with exact scores under any schedule.

With ``x_t = alpha x0 + sigma eps`` and component ``k`` = N(mu_k, s_k^2 I), the noisy marginal of
component ``k`` is N(alpha mu_k, v_k I) with ``v_k = alpha^2 s_k^2 + sigma^2``, and the posterior mean
(Tweedie's formula, Efron 2011; Robbins 1956) is

    E[x0 | x_t] = sum_k r_k(x_t) [mu_k + alpha s_k^2 / v_k (x_t - alpha mu_k)],

with responsibilities ``r_k`` proportional to ``w_k N(x_t; alpha mu_k, v_k I)``. Conditioning on a
class restricts the sum to that class's components, so classifier-free guidance is exact too.
Because the truth is known, tests can measure how far a distilled student is from it.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from distill.models.conditioning import ClassConditioner
from distill.models.denoiser import Denoiser
from distill.models.schedules import Schedule


class GaussianMixture(nn.Module):
    """A mixture of isotropic Gaussians in ``dim`` dimensions, optionally with a class per component.

    Args:
        means: [K, D] component means.
        stds: scalar or [K] per-component standard deviation.
        weights: [K] mixture weights (normalised here); uniform by default.
        labels: [K] class of each component, or None for an unconditional mixture.
        sample_shape: shape of one sample (e.g. ``(1, 8, 8)`` for an image mixture); ``(D,)`` by default.
    """

    def __init__(self, means, stds=0.1, weights=None, labels=None, sample_shape: Sequence[int] | None = None):
        super().__init__()
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError(f"means must be K x D, got shape {tuple(means.shape)}")
        k, d = means.shape
        stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (k,) or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError("weights must be K non-negative numbers with a positive sum")
        if (stds <= 0).any():
            raise ValueError("stds must be positive")
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights / weights.sum())
        if labels is not None:
            labels = torch.as_tensor(labels, dtype=torch.long)
            if labels.shape != (k,):
                raise ValueError(f"labels must give one class per component ({k}), got {tuple(labels.shape)}")
        self.register_buffer("labels", labels)
        # host-side fact, fixed at construction: reading it from the buffer would synchronise the device
        self._num_classes = 0 if labels is None else int(labels.max()) + 1
        self.sample_shape = tuple(sample_shape) if sample_shape is not None else (d,)
        if math.prod(self.sample_shape) != d:
            raise ValueError(f"sample_shape {self.sample_shape} does not hold {d} values")

    # ------------------------------------------------------------------ basic facts
    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return self._num_classes

    def component_weights(self, class_labels: torch.Tensor | None, batch: int) -> torch.Tensor:
        """[B, K] mixture weights given class labels (-1 or None: the whole mixture)."""
        w = self.weights.expand(batch, -1)
        if class_labels is None or self.labels is None:
            return w
        class_labels = class_labels.to(self.means.device).reshape(-1, 1)
        mask = (self.labels[None, :] == class_labels) | (class_labels < 0)
        w = w * mask
        return w / w.sum(dim=1, keepdim=True)

    # ------------------------------------------------------------------ sampling and density
    def sample(self, n: int, class_labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
               return_components: bool = False):
        """Draw ``n`` samples (float32, shape [n, *sample_shape]); optionally the component indices."""
        w = self.component_weights(class_labels, n)
        comp = torch.multinomial(w.float(), 1, generator=generator).squeeze(1)
        noise = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        x = self.means[comp] + self.stds[comp, None] * noise
        x = x.float().reshape(n, *self.sample_shape)
        return (x, comp) if return_components else x

    @staticmethod
    def _per_sample(coef, x: torch.Tensor) -> torch.Tensor:
        """A scalar or [B] coefficient as [B, 1] float64."""
        coef = torch.as_tensor(coef, dtype=torch.float64, device=x.device)
        return coef.expand(x.shape[0]).reshape(-1, 1) if coef.ndim == 0 else coef.reshape(-1, 1)

    def log_prob_noisy(self, x_t: torch.Tensor, alpha, sigma, class_labels=None) -> torch.Tensor:
        """log q_t(x_t) of the noised mixture, per sample, float64."""
        x = x_t.reshape(x_t.shape[0], -1).double()
        alpha, sigma = self._per_sample(alpha, x), self._per_sample(sigma, x)
        var = alpha**2 * self.stds[None, :] ** 2 + sigma**2  # [B, K]
        sq = ((x[:, None, :] - alpha[:, :, None] * self.means[None]) ** 2).sum(-1)  # [B, K]
        logw = self.component_weights(class_labels, x.shape[0]).clamp_min(1e-300).log()
        log_comp = -0.5 * sq / var - 0.5 * self.dim * torch.log(2 * math.pi * var)
        return torch.logsumexp(logw + log_comp, dim=1)

    def log_prob(self, x: torch.Tensor, class_labels=None) -> torch.Tensor:
        """log p(x) of clean data."""
        return self.log_prob_noisy(x, 1.0, 0.0, class_labels)

    def posterior_mean(self, x_t: torch.Tensor, alpha, sigma, class_labels=None) -> torch.Tensor:
        """Exact ``E[x0 | x_t]`` for ``x_t = alpha x0 + sigma eps``; alpha, sigma scalars or [B]."""
        shape, dtype = x_t.shape, x_t.dtype
        x = x_t.reshape(shape[0], -1).double()
        alpha, sigma = self._per_sample(alpha, x), self._per_sample(sigma, x)
        s2 = self.stds[None, :] ** 2
        var = alpha**2 * s2 + sigma**2  # [B, K]
        diff = x[:, None, :] - alpha[:, :, None] * self.means[None]  # [B, K, D]
        logits = -0.5 * (diff**2).sum(-1) / var - 0.5 * self.dim * torch.log(var)
        logits = logits + self.component_weights(class_labels, x.shape[0]).clamp_min(1e-300).log()
        resp = torch.softmax(logits, dim=1)  # [B, K]
        comp_mean = self.means[None] + (alpha * s2 / var)[:, :, None] * diff
        return (resp[:, :, None] * comp_mean).sum(1).to(dtype).reshape(shape)


class MixtureBackbone(nn.Module):
    """Backbone view of a mixture: ``(x_t, t, class_labels) -> exact x0`` under ``schedule``."""

    takes_schedule_time = True

    def __init__(self, mixture: GaussianMixture, schedule: Schedule):
        super().__init__()
        self.mixture, self.schedule = mixture, schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        alpha, sigma = self.schedule.alpha_sigma(t)
        return self.mixture.posterior_mean(x_t, alpha, sigma, class_labels)


def mixture_denoiser(mixture: GaussianMixture, schedule: Schedule) -> Denoiser:
    """An exact x0-predicting :class:`~models.denoiser.Denoiser` for ``mixture``."""
    return Denoiser(MixtureBackbone(mixture, schedule), schedule, prediction_type="sample")


def mixture_conditioner(mixture: GaussianMixture) -> ClassConditioner | None:
    """Class conditioning for a labelled mixture (null label -1 = the whole mixture), else None."""
    return ClassConditioner(mixture.num_classes, null_label=-1) if mixture.labels is not None else None


# ---------------------------------------------------------------------- presets
def ring(num_modes: int = 8, radius: float = 1.0, std: float = 0.1, classes: int = 0) -> GaussianMixture:
    """``num_modes`` equal modes on a circle; with ``classes`` > 0, modes alternate between classes."""
    angles = torch.arange(num_modes, dtype=torch.float64) * (2 * math.pi / num_modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    labels = torch.arange(num_modes) % classes if classes else None
    return GaussianMixture(means, std, labels=labels)


def grid(side: int = 5, spacing: float = 0.5, std: float = 0.05) -> GaussianMixture:
    """A ``side x side`` grid of equal modes centred on the origin."""
    coords = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(coords, coords)
    return GaussianMixture(means, std)


def image_mixture(num_modes: int = 4, size: int = 8, channels: int = 1, std: float = 0.1,
                  seed: int = 0) -> GaussianMixture:
    """Modes that are fixed random +-0.5 images of shape (channels, size, size): an image-space toy."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.randint(0, 2, (num_modes, channels * size * size), generator=g).double() - 0.5)
    return GaussianMixture(means, std, sample_shape=(channels, size, size))


PRESETS = {
    "ring8": lambda: ring(8),
    "grid25": lambda: grid(5),
    "cond-ring8": lambda: ring(8, classes=2),
    "image4": lambda: image_mixture(4),
}


def build_mixture(preset: str | None = None, means=None, std=None, stds=None, weights=None, labels=None,
                  sample_shape=None) -> GaussianMixture:
    """A mixture from a preset name or explicit parameters (as in a recipe's ``teacher:`` block)."""
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"unknown mixture preset {preset!r}; expected one of {sorted(PRESETS)}")
        return PRESETS[preset]()
    if means is None:
        raise ValueError("a gmm teacher needs either `preset` or `means`")
    spread = stds if stds is not None else (std if std is not None else 0.1)
    return GaussianMixture(means, spread, weights=weights, labels=labels, sample_shape=sample_shape)
