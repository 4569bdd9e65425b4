"""Regression warm start: fit the student to the teacher's ODE map before distribution matching.

DMD (Yin et al. 2023, Sec. 3.3, Eq. 9) regresses the one-step generator onto noise -> image pairs from
the teacher's deterministic sampler; DMD2 drops it in general but keeps "a short regression warm start"
for its one-step SDXL model (DMD2 Sec. 5.3). Here the pairs are made on the fly from the run's own
batch source (same noise, same conditioning) with the teacher's DDIM sampler and guidance, and the loss
is MSE in x0 space (DMD used LPIPS on decoded images).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from distill.config import WarmStartConfig
from distill.samplers import sample_ddim


def _pair_batches(teacher, data, config: WarmStartConfig, timesteps, device):
    """Yield (batch, target) forever: from a fixed pool of ``config.pairs`` pairs, or fresh pairs each step."""
    rows = slice(0, data.global_batch_size)
    if config.pairs <= 0:
        step = 0
        while True:
            # negative steps keep warm-start batches apart from the training batches of the same run
            batch = data(-1 - step, rows, device)
            yield batch, sample_ddim(teacher, batch.noise, batch.cond, timesteps, config.guidance_scale)
            step += 1
    pool = []
    for i in range(-(-config.pairs // data.global_batch_size)):
        batch = data(-1 - i, rows, device)
        pool.append((batch, sample_ddim(teacher, batch.noise, batch.cond, timesteps, config.guidance_scale)))
    while True:
        yield from pool


def regression_warm_start(student, teacher, data, config: WarmStartConfig, device=None, progress: bool = True) -> float:
    """Train ``student`` (its first step) to reproduce ``teacher``'s DDIM output from the same noise.

    Noise and conditioning come from the run's batch source ``data(step, rows, device)``. With
    ``config.pairs > 0`` a fixed set of noise -> sample pairs is made once and cycled over (DMD's
    precomputed regression dataset); otherwise every step makes fresh pairs. Returns the last loss.
    """
    if config.steps <= 0:
        return float("nan")
    schedule = teacher.schedule
    spacing = {"spacing": "trailing"} if schedule.discrete else {}
    timesteps = schedule.inference_timesteps(config.ode_steps, **spacing)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=config.lr)
    pairs = _pair_batches(teacher, data, config, timesteps, device)
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(config.steps), desc="warm start", disable=not progress):
        batch, target = next(pairs)
        loss = ((student(batch.noise, batch.cond) - target) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return float(loss.detach())
