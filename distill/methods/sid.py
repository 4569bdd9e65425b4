"""SiD: Score identity Distillation (Zhou et al. 2024, arXiv:2404.04057; reference: mingyuanzhou/SiD).

SiD distils a diffusion model into a one-step generator ``x_g = G(sigma_init z)`` (``sigma_init = 2.5`` in EDM
units; on a VP schedule the student's ``noise_scale: sigma`` at the timestep whose EDM sigma is 2.5) by
minimising a Fisher divergence between the teacher's and the generator's noisy distributions, made
tractable with three score identities and an online fake score ``f_psi`` (SiD Sec. 3-4). The generator
loss is SiD's Eq. (23)-(24) (the "alpha-weighted" loss, METHODS.md Sec. 3)::

    x_t = x_g + sigma n,   y_real = f_phi(x_t),   y_fake = f_psi(x_t)
    wf = mean_{CHW}|x_g - y_real|                              (detached)
    L = (y_real - y_fake) . ((y_real - x_g) - alpha (y_real - y_fake)) / wf,   alpha = 1.2

with the gradient flowing into ``x_g`` through the explicit ``x_g`` and through **both** networks' inputs
(neither network's weights change in this step). ``alpha = 1`` is the plain score-identity loss (and SIM's
L2 special case, ``sim.py``); SiD-LSG (Zhou et al. 2024b, arXiv:2406.01561) uses ``alpha = 1`` with
teacher CFG (``guidance_scale``, their ``cfg_eval_real``) and uniform ``t`` in 20..980. Times, the fake-score
loss, NaN dropping and the update order are shared with SIM: see :mod:`distill.methods.score_implicit`.

Optimiser: SiD uses Adam with ``betas = (0, 0.999)`` for both networks (no first-moment momentum, as in
StyleGAN-era GAN training) and no weight decay; the recipes set ``generator_optim.betas: [0, 0.999]`` and
``critic_optim.betas: [0, 0.999]`` (the trainer's optimiser is AdamW; ``weight_decay: 0`` makes it Adam).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from distill.methods.score_implicit import ScoreImplicitConfig, ScoreImplicitMethod, sample_mean


@dataclass
class SiDConfig(ScoreImplicitConfig):
    alpha: float = 1.2  # SiD's alpha (1.2 for EDM CIFAR/ImageNet; 1.0 in SiD-LSG)


def sid_loss(x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor, alpha: float,
             normaliser: torch.Tensor) -> torch.Tensor:
    """Per-sample SiD loss ``mean_{CHW}[(y_real - y_fake) ((y_real - x) - alpha (y_real - y_fake))] / wf``; [B]."""
    diff = y_real - y_fake
    return sample_mean(diff * ((y_real - x) - alpha * diff)) / normaliser


class SiD(ScoreImplicitMethod):
    """Score identity Distillation over a teacher, a one-step student and a fake score."""

    config_class = SiDConfig

    def per_sample_loss(self, x, y_real, y_fake, t):
        return sid_loss(x, y_real, y_fake, self.config.alpha, self.normaliser(x, y_real, t))
