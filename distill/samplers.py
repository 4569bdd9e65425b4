"""Samplers: pure ``@torch.no_grad()`` functions ``(model, noise, cond, timesteps, ...) -> x0``.

``model`` is anything with ``.schedule`` and ``.guided(x_t, t, cond, scale) -> x0``: a
:class:`~models.denoiser.Denoiser`, a :class:`~models.roles.Teacher` or a :class:`~models.roles.Student`.
The same functions serve analytic, toy and diffusers-backed models.

* :func:`sample_ddim` -- DDIM (Song et al. 2021, Eq. 12), deterministic or with ``eta``; with
  diffusers' timesteps it reproduces ``DDIMScheduler`` step for step.
* :func:`sample_euler` -- Euler on the probability-flow ODE in EDM coordinates (Karras et al. 2022,
  Algorithm 2 without the Heun correction), with optional churn ``s_churn``.
* :func:`sample_student` -- one-step / multi-step student: predict x0, re-noise it with **fresh** noise to
  the next timestep (DMD2 Sec. 4.4; LCM's multistep sampler, Luo et al. 2023, Algorithm 1). A consistency
  student's denoiser (:class:`distill.methods.consistency.ConsistencyDenoiser`) applies LCM's boundary
  scalings itself, so this is exactly ``LCMScheduler`` sampling of the exported UNet.
* :func:`sample_hybrid` -- teacher for the first step(s), then the student (Distilling Diversity and
  Control, 2025).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from distill.models.conditioning import Cond


def _times(timesteps, device) -> torch.Tensor:
    return torch.as_tensor(timesteps if not isinstance(timesteps, torch.Tensor) else timesteps).to(device)


def _end_time(schedule) -> float:
    """The time that means clean data: -1 for discrete VP, 0 for continuous schedules."""
    return -1 if schedule.discrete else 0.0


def _full(t, batch: int, device) -> torch.Tensor:
    return torch.as_tensor(t, device=device).expand(batch)


def _randn_like(x: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal like ``x``, drawn on the generator's own device and moved to ``x``'s: a CPU generator
    drives a GPU (or meta) sampler, and one seed gives the same noise on every device. ``generator`` may be a
    list with one generator per sample: each sample's noise then comes from its own generator, as diffusers'
    ``randn_tensor`` does, so image ``i`` depends only on its own seed, whatever the batch."""
    if generator is None:
        return torch.randn(x.shape, device=x.device, dtype=x.dtype)
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {x.shape[0]}")
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype)
                          for g in generator]).to(x.device)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


@torch.no_grad()
def sample_ddim(model, noise: torch.Tensor, cond: Cond | None = None, timesteps: Sequence | torch.Tensor = (),
                guidance_scale: float = 1.0, next_timesteps: Sequence | torch.Tensor | None = None,
                eta: float = 0.0, generator: torch.Generator | None = None,
                return_trajectory: bool = False):
    """DDIM from ``x = noise`` over descending ``timesteps``; returns the final sample (x0 when ending clean).

    Args:
        timesteps: visited times, descending (e.g. ``VPSchedule.inference_timesteps(4, "leading", 1)``).
        next_timesteps: where each step lands; default ``timesteps[1:]`` then clean data. Pass
            ``VPSchedule.ddim_previous(timesteps, final="zero")`` to match SDXL's ``DDIMScheduler`` exactly.
        eta: 0 is deterministic DDIM; 1 is DDPM-like ancestral sampling.
    """
    schedule = model.schedule
    ts = _times(timesteps, noise.device)
    if next_timesteps is None:
        nxt = torch.cat([ts[1:], torch.tensor([_end_time(schedule)], device=ts.device, dtype=ts.dtype)])
    else:
        nxt = _times(next_timesteps, noise.device)
    x, batch, trajectory = noise, noise.shape[0], []
    for t, t_next in zip(ts, nxt):
        t_b, tn_b = _full(t, batch, x.device), _full(t_next, batch, x.device)
        x0 = model.guided(x, t_b, cond, guidance_scale)
        if eta == 0.0:
            x = schedule.step_to(x0, x, t_b, tn_b)
        else:  # DDIM Eq. 16: part of the implied noise is replaced by fresh noise
            a_t, s_t = schedule.alpha_sigma(t_b[:1])
            a_n, s_n = schedule.alpha_sigma(tn_b[:1])
            eps = schedule.eps_from_x0(x0, x, t_b)
            var_ratio = ((s_n / s_t) ** 2 * (1 - (a_t / a_n) ** 2)).clamp_min(0)
            s_noise = (eta * var_ratio.sqrt()).to(x.dtype)
            s_keep = (s_n**2 - s_noise.double() ** 2).clamp_min(0).sqrt().to(x.dtype)
            x = a_n.to(x.dtype) * x0 + s_keep * eps + s_noise * _randn_like(x, generator)
        trajectory.append(x0)
    return (x, trajectory) if return_trajectory else x


@torch.no_grad()
def sample_euler(model, noise: torch.Tensor, cond: Cond | None = None, timesteps: Sequence | torch.Tensor = (),
                 guidance_scale: float = 1.0, s_churn: float = 0.0, generator: torch.Generator | None = None):
    """Euler steps of the probability-flow ODE with optional churn (Karras et al. 2022, Algorithm 2, no Heun).

    The ODE step is taken in the schedule's own coordinates (``Schedule.step_to``: for VP it is Euler in
    EDM coordinates ``x / alpha``, for flow it is Euler on the velocity), so with ``s_churn = 0`` it is
    deterministic DDIM. ``s_churn > 0`` first raises the noise level by ``gamma = min(s_churn / N, sqrt(2) - 1)``
    (EDM sigma ``sigma (1 + gamma)``, rounded to a timestep on discrete schedules) with the exact forward
    transition ``x_hat = (a_hat / a) x + sqrt(s_hat^2 - (a_hat / a)^2 s^2) eps``.
    """
    schedule = model.schedule
    ts = _times(timesteps, noise.device)
    ends = torch.cat([ts[1:], torch.tensor([_end_time(schedule)], device=ts.device, dtype=ts.dtype)])
    gamma = min(s_churn / max(len(ts), 1), math.sqrt(2) - 1)
    x, batch = noise, noise.shape[0]
    for t, t_next in zip(ts, ends):
        t_b = _full(t, batch, x.device)
        if gamma > 0:
            alpha, sigma = schedule.alpha_sigma(t_b[:1])
            if float(alpha) > 0:  # at pure noise there is no higher level to raise to
                t_hat = schedule.t_from_edm_sigma(sigma / alpha * (1 + gamma)).reshape(()).to(ts.dtype)
                if schedule.discrete:
                    t_hat = t_hat.clamp(max=schedule.t_max)
                a_hat, s_hat = schedule.alpha_sigma(t_hat.reshape(1))
                ratio = a_hat / alpha
                extra = (s_hat**2 - ratio**2 * sigma**2).clamp_min(0).sqrt()
                x = ratio.to(x.dtype) * x + extra.to(x.dtype) * _randn_like(x, generator)
                t_b = _full(t_hat, batch, x.device)
        x0 = model.guided(x, t_b, cond, guidance_scale)
        x = schedule.step_to(x0, x, t_b, _full(t_next, batch, x.device))
    return x


@torch.no_grad()
def sample_student(model, noise: torch.Tensor, cond: Cond | None = None,
                   timesteps: Sequence | torch.Tensor | None = None, generator: torch.Generator | None = None,
                   return_trajectory: bool = False, x_start: torch.Tensor | None = None):
    """Multi-step student sampling: x0 at each time, re-noised with fresh noise to the next time.

    ``timesteps`` defaults to the student's own. The first input is ``model.input_from_noise(noise)``
    when the model is a :class:`~models.roles.Student` (pure noise otherwise). Noise is drawn from
    ``generator`` once per re-noise, in step order, as diffusers' ``LCMScheduler`` draws it; a list of
    generators (one per sample) draws each sample's noise from its own, as pipelines do with such a list.
    ``x_start`` replaces the first input (an already noisy sample at ``timesteps[0]``).
    """
    schedule = model.schedule
    ts = _times(model.timesteps if timesteps is None else timesteps, noise.device)
    if x_start is not None:
        x = x_start
    else:
        x = model.input_from_noise(noise) if hasattr(model, "input_from_noise") else noise
    batch, trajectory = noise.shape[0], []
    x0 = x
    for i, t in enumerate(ts):
        x0 = model.guided(x, _full(t, batch, x.device), cond, 1.0)
        trajectory.append(x0)
        if i + 1 < len(ts):
            x = schedule.add_noise(x0, _randn_like(x0, generator), _full(ts[i + 1], batch, x.device))
    return (x0, trajectory) if return_trajectory else x0


@torch.no_grad()
def sample_hybrid(teacher, student, noise: torch.Tensor, cond: Cond | None = None,
                  teacher_timesteps: Sequence | torch.Tensor = (999,), student_timesteps=None,
                  guidance_scale: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Teacher DDIM over ``teacher_timesteps`` down to the student's first time, then the student."""
    s_ts = _times(student.timesteps if student_timesteps is None else student_timesteps, noise.device)
    t_ts = _times(teacher_timesteps, noise.device)
    x = sample_ddim(teacher, noise, cond, t_ts, guidance_scale,
                    next_timesteps=torch.cat([t_ts[1:], s_ts[:1].to(t_ts.dtype)]))
    return sample_student(student, noise, cond, s_ts, generator, x_start=x)
