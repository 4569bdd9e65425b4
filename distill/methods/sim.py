"""SIM: Score Implicit Matching (Luo et al. 2024, "One-Step Diffusion Distillation through Score Implicit
Matching", arXiv:2410.16794).

SIM minimises ``int w(t) E_{x_t ~ q_t} d(s_phi(x_t) - s_q(x_t)) dt`` for a distance ``d`` between the teacher's
score and the generator's (SIM Sec. 3); the score-implicit identity (SIM Theorem 3.1) turns its gradient into a
loss on the generator's samples, with an online fake score ``f_psi`` standing in for ``s_q``. In denoiser units
(METHODS.md Sec. 4; the official training code was never released, so this is a derivation consistent with
the paper)::

    x_t = x_g + sigma n,   y = f_phi(x_t) - f_psi(x_t),   u = y / sigma^2    (score difference)
    d'(u) = u / sqrt(||u||^2 + c^2) = y / sqrt(||y||^2 + (c sigma^2)^2)   # pseudo-Huber sqrt(||u||^2 + c^2) - c
    d'(u) = u = y / sigma^2                                               # L2, d = ||u||^2 / 2
    L = w(t) d'(u) . (f_psi(x_t) - x_g) / wf                             # f_psi - x_g = sigma^2 (s_psi - grad log q(x_t | x_g))

``sigma`` is the EDM sigma (noise-to-signal ratio; coordinates ``x_t / alpha``), ``||.||`` the norm over all of a
sample's elements, ``wf`` SiD's per-sample normaliser. With the default ``w(t) = sigma^2`` the L2 case is exactly
SiD with ``alpha = 1`` (tests/test_sid_sim.py checks loss and gradient), and the pseudo-Huber loss is SiD's
(alpha = 1) divided by ``c`` wherever ``||u|| << c`` (its quadratic regime), while samples whose score
difference exceeds ``c`` are down-weighted by ``c / ||u||`` (``c -> 0``: unit-normalised directions).

**Unverified choices** (the paper does not pin them down; all are options):

* ``huber_c`` (``c``, in score units per sample; default 1, chosen on the 2-D toys where it keeps the
  high-noise terms that set the mode weights). ``||u||`` grows like ``sqrt(D)``: ``huber_c_per_dim: true``
  multiplies ``c`` by ``sqrt(D)`` (the iCT convention for pseudo-Huber constants), so that one value means
  the same at every resolution.
* ``time_weight`` ``w(t)``: ``sigma2`` (default: the weight under which L2 is SiD) or ``one`` (METHODS.md's
  formula taken literally; on the toys it starves the high-noise terms and the mode weights drift).
* ``detach_norm``: the denominator ``sqrt(||u||^2 + c^2)`` is detached by default (a per-sample weight, as in
  the identity's derivation); ``false`` differentiates it too.
* the time distribution and the normaliser ``wf``: as SiD (``karras``, ``normaliser: sid``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from distill.methods.score_implicit import ScoreImplicitConfig, ScoreImplicitMethod, sample_mean
from distill.models.errors import ToolkitError
from distill.models.schedules import expand_like


@dataclass
class SIMConfig(ScoreImplicitConfig):
    distance: str = "pseudo_huber"  # or "l2" (= SiD with alpha 1)
    huber_c: float = 1.0
    huber_c_per_dim: bool = False
    detach_norm: bool = True
    time_weight: str = "sigma2"  # "sigma2" (sigma_edm^2) or "one"


def sim_direction(y: torch.Tensor, sigma: torch.Tensor, distance: str = "pseudo_huber", c: float = 1.0,
                  detach_norm: bool = True) -> torch.Tensor:
    """``d'(u)`` for the score difference ``u = y / sigma^2`` (``y``: [B, ...] x0 difference, ``sigma``: [B] EDM sigma).

    L2: ``y / sigma^2``; pseudo-Huber: ``y / sqrt(||y||^2 + (c sigma^2)^2)``.
    """
    sigma2 = sigma.to(y.dtype) ** 2
    if distance == "l2":
        return y / expand_like(sigma2, y)
    norm = (y.flatten(1).pow(2).sum(1) + (c * sigma2) ** 2).sqrt()
    if detach_norm:
        norm = norm.detach()
    return y / expand_like(norm, y)


class SIM(ScoreImplicitMethod):
    """Score Implicit Matching over a teacher, a one-step student and a fake score."""

    config_class = SIMConfig

    def __init__(self, teacher, student, fake_score, config: SIMConfig):
        if config.distance not in ("pseudo_huber", "l2"):
            raise ToolkitError(f"method.distance must be pseudo_huber or l2, got {config.distance!r}")
        if config.time_weight not in ("sigma2", "one"):
            raise ToolkitError(f"method.time_weight must be sigma2 or one, got {config.time_weight!r}")
        super().__init__(teacher, student, fake_score, config)

    def per_sample_loss(self, x, y_real, y_fake, t):
        cfg = self.config
        sigma = self.edm_sigma(t, x)
        c = cfg.huber_c * (math.sqrt(x[0].numel()) if cfg.huber_c_per_dim else 1.0)
        direction = sim_direction(y_real - y_fake, sigma, cfg.distance, c, cfg.detach_norm)
        loss = sample_mean(direction * (y_fake - x)) / self.normaliser(x, y_real, t)
        return loss * sigma**2 if cfg.time_weight == "sigma2" else loss
