"""The Method contract: small loss classes that do not own the loop (EDM2-style losses beside the loop).

A method holds the roles it needs (teacher, student, fake score, ...) and exposes

* ``generator_loss(batch) -> (loss, logs)``: the loss whose gradient updates ``generator_parameters()``;
* ``critic_loss(batch, sample=None) -> (loss, logs)`` or ``None``: updates ``critic_parameters()``
  (fake score, discriminator head); ``sample`` is the generator output of the same iteration, detached,
  when the trainer already has one (saves a generator forward);
* ``generator_every``: the two time-scale update ratio (the critic trains every iteration, the generator
  every ``generator_every`` iterations; DMD2 Sec. 4.1).

Everything stateful (optimisers, devices, precision, checkpoints) belongs to the Trainer.

Randomness inside a loss is drawn through :class:`BatchRNG`, which draws for the *global* batch and keeps
this process's slice, so that N processes with the same global batch see exactly the noise one process
would: the distributed run then matches the single-process run up to float summation order.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from distill.models.conditioning import Cond
from distill.models.schedules import Schedule, expand_like


class BatchRNG:
    """Per-step random numbers drawn for the global batch; each process keeps its own rows.

    Args:
        seed: the run's seed; ``step``: the iteration; every call advances an internal counter, so the
            n-th draw of a step is the same in every process and on resume.
        global_size: samples in the global batch; ``rows``: this process's slice of it.
    """

    def __init__(self, seed: int, step: int, global_size: int, rows: slice, device=None, stream: int = 0):
        self.seed, self.step, self.global_size, self.rows = seed, step, global_size, rows
        self.device, self.stream, self._calls = device, stream, 0

    def _generator(self) -> torch.Generator:
        self._calls += 1
        g = torch.Generator()
        g.manual_seed((self.seed * 1_000_003 + self.step * 10_007 + self.stream * 101 + self._calls) % (2**63))
        return g

    def randn(self, *shape: int, dtype=torch.float32) -> torch.Tensor:
        """Standard normal [local batch, *shape]."""
        x = torch.randn(self.global_size, *shape, generator=self._generator(), dtype=dtype)
        return x[self.rows].to(self.device)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(*x.shape[1:], dtype=x.dtype)

    def rand(self, dtype=torch.float64) -> torch.Tensor:
        """Uniform [0, 1) per sample."""
        return torch.rand(self.global_size, generator=self._generator(), dtype=dtype)[self.rows].to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """Integers in [low, high) per sample."""
        g = self._generator()
        return torch.randint(low, high, (self.global_size,), generator=g)[self.rows].to(self.device)

    def choice(self, n: int) -> int:
        """One integer in [0, n), the same in every process (e.g. DMD2's backward-simulation step)."""
        return int(torch.randint(0, n, (1,), generator=self._generator()))

    def times(self, schedule: Schedule, low: float | None = None, high: float | None = None) -> torch.Tensor:
        """Training times per sample, uniform over ``[low, high]`` in the schedule's own units."""
        g = self._generator()
        t = schedule.sample_t(self.global_size, low, high, generator=g)
        return t[self.rows].to(self.device)

    def fork(self, stream: int) -> "BatchRNG":
        """An independent stream for the same step (e.g. the critic's draws)."""
        return BatchRNG(self.seed, self.step, self.global_size, self.rows, self.device, stream)


@dataclass
class Batch:
    """One process's share of a training batch.

    ``noise``: generator input z; ``cond``: conditioning for the generator (and teacher/fake score);
    ``real`` / ``real_cond``: real data (latents) for GAN losses, if any; ``rng``: loss randomness.
    """

    noise: torch.Tensor
    cond: Cond | None
    rng: BatchRNG
    real: torch.Tensor | None = None
    real_cond: Cond | None = None
    extra: dict = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.noise.shape[0]


def denoising_loss(denoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, cond: Cond | None,
                   weighting: str = "native", sigma_data: float = 0.5) -> torch.Tensor:
    """Denoising score matching (Ho et al. 2020; Vincent 2011) on clean ``x0``, per-sample mean.

    Written in x0 space with a weight that reproduces each parameterisation's MSE:
    ``"eps"``: ``(alpha/sigma)^2`` (eps-MSE, DMD2's fake-score loss for SD UNets); ``"v"``: ``1/sigma^2``
    (v-MSE); ``"x0"``: 1; ``"edm"``: ``1/sigma_edm^2 + 1/sigma_data^2`` (Karras et al. 2022, Eq. 8 with
    ``lambda``); ``"native"``: the MSE of whatever the network predicts.
    """
    schedule = denoiser.schedule
    x_t = schedule.add_noise(x0, eps, t)
    x0_hat = denoiser(x_t, t, cond)
    if weighting == "native":
        weighting = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow": "flow"}[denoiser.prediction_type]
    alpha, sigma = schedule.alpha_sigma(t)
    weights = {
        "eps": (alpha / sigma) ** 2,
        "v": 1.0 / sigma**2,
        "flow": 1.0 / sigma**2,  # v = eps - x0 => v error = x0 error / t
        "x0": torch.ones_like(alpha),
        "edm": (alpha / sigma) ** 2 + 1.0 / sigma_data**2,
    }
    if weighting not in weights:
        raise ValueError(f"unknown denoising weighting {weighting!r}")
    w = expand_like(weights[weighting].to(x0.dtype), x0)
    per_sample = (w * (x0_hat - x0.detach()) ** 2).flatten(1).mean(1)
    return per_sample.mean()


def pooled_by_time(values: torch.Tensor, t: torch.Tensor, pool: int) -> torch.Tensor:
    """Each of ``values`` [B] replaced by the mean over the ``pool`` samples nearest in ``t`` (itself included):
    a moving average in time order, with the window shifted inwards at both ends."""
    n = values.shape[0]
    pool = min(pool, n)
    if pool <= 1:
        return values
    order = torch.argsort(t.detach().double(), stable=True)
    sums = torch.cat([values.new_zeros(1), values[order].double().cumsum(0)])
    start = (torch.arange(n, device=values.device) - pool // 2).clamp(0, n - pool)
    pooled = ((sums[start + pool] - sums[start]) / pool).to(values.dtype)
    out = torch.empty_like(values)
    out[order] = pooled
    return out


def generate(student, batch: Batch, grad: bool = True, backward_simulation: bool = True) -> torch.Tensor:
    """The generator's x0 for ``batch`` (with gradient when ``grad``).

    One-step students: ``G(z, c)``. Multi-step students with backward simulation (DMD2 Sec. 4.4): draw
    ``k ~ U{0..K-1}`` for the batch, run ``k`` steps from noise without gradient, re-noising each x0 with
    **fresh** noise to the next time, then the x0 prediction at ``t_k`` carries the gradient. Without
    backward simulation a multi-step student is trained at its first step only.
    """
    k = batch.rng.choice(student.num_steps) if backward_simulation and student.num_steps > 1 else 0
    x = student.input_from_noise(batch.noise)
    with torch.no_grad():
        for i in range(k):
            x0 = student.denoiser(x, student.times(i, batch.size, x.device), batch.cond)
            x = student.schedule.add_noise(x0, batch.rng.randn_like(x0), student.times(i + 1, batch.size, x.device))
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        return student.denoiser(x, student.times(k, batch.size, x.device), batch.cond)


class Method(ABC):
    """Base class: a distillation objective over the roles it holds. See the module docstring."""

    #: generator update every this many iterations (two time-scale update rule)
    generator_every: int = 1

    @abstractmethod
    def generator_loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        ...

    def critic_loss(self, batch: Batch, sample: torch.Tensor | None = None) -> tuple[torch.Tensor, dict] | None:
        return None

    @abstractmethod
    def generator_modules(self) -> dict[str, nn.Module]:
        """Named modules updated by the generator loss (checkpointed, synchronised)."""

    def critic_modules(self) -> dict[str, nn.Module]:
        """Named modules updated by the critic loss."""
        return {}

    def generator_parameters(self) -> list[nn.Parameter]:
        return _trainable(self.generator_modules().values())

    def critic_parameters(self) -> list[nn.Parameter]:
        return _trainable(self.critic_modules().values())

    def on_generator_step(self, step: int) -> None:
        """Hook after each generator optimiser step (e.g. a consistency method's EMA target)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the modules' weights to checkpoint (e.g. an EMA target)."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


def _trainable(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    seen, out = set(), []
    for module in modules:
        for p in module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def no_autocast(device: torch.device):
    """A context that turns autocast off on ``device`` (a no-op where autocast does not exist, e.g. meta)."""
    import contextlib

    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


class frozen:
    """Context manager: parameters of ``modules`` get no gradient inside (gradients still flow to inputs).

    Used for the fake score during the generator step (DMD2 freezes it there), without copying weights.
    Accepts modules or parameters (the Trainer freezes the other optimisers' parameters this way).
    """

    def __init__(self, *modules: nn.Module | nn.Parameter):
        self.params = [p for m in modules for p in (m.parameters() if isinstance(m, nn.Module) else [m])]

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.params]
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc):
        for p, flag in zip(self.params, self.flags):
            p.requires_grad_(flag)
