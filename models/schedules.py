"""Noise schedules: the one place where times, noise levels and prediction types are converted.

Every schedule writes the forward process as ``x_t = alpha(t) * x0 + sigma(t) * eps`` and every
model output (eps, v, x0, flow velocity) is turned into an x0 prediction here, so that methods and
samplers speak x0 only (k-diffusion's one-contract idea, Karras et al. 2022, "Elucidating the Design
Space of Diffusion-Based Generative Models", Sec. 2).

* :class:`VPSchedule` -- DDPM / variance preserving, discrete (Ho et al. 2020, Eq. 4). SD1.5 and SDXL use
  ``scaled_linear`` betas 0.00085 -> 0.012 over 1000 steps. Times are integer timesteps; ``t < 0``
  means "clean data" (``alpha = 1, sigma = 0``), which is diffusers' ``final_alpha_cumprod = 1``.
* :class:`FlowSchedule` -- rectified flow (Liu et al. 2023; Esser et al. 2024, SD3 Eq. 1-3):
  ``x_t = (1 - t) x0 + t eps`` with ``t`` in [0, 1] and velocity ``v = eps - x0``; timestep shift
  ``t' = s t / (1 + (s - 1) t)`` (SD3 Sec. 5.3.2).
* :class:`EDMSchedule` -- variance exploding in EDM form: ``x = x0 + sigma eps``, the time is sigma.

Conversions run in float64 where precision matters (x0 from eps at t near 999 divides by 0.068).
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal

import torch

PredictionType = Literal["epsilon", "v_prediction", "sample", "flow"]
_PREDICTION_ALIASES = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction",
                       "x0": "sample", "sample": "sample", "flow": "flow"}


def canonical_prediction_type(name: str) -> str:
    """Map the names people use (``eps``, ``v``, ``x0``) to diffusers' names."""
    try:
        return _PREDICTION_ALIASES[name]
    except KeyError:
        raise ValueError(f"unknown prediction type {name!r}; expected one of {sorted(_PREDICTION_ALIASES)}") from None


def expand_like(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a per-sample coefficient [B] (or scalar) to broadcast against ``like`` [B, ...]."""
    coef = torch.as_tensor(coef, device=like.device)
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (like.ndim - 1)))


class Schedule(ABC):
    """The forward process ``x_t = alpha(t) x0 + sigma(t) eps`` and all conversions derived from it."""

    #: whether times are integer timesteps (VP, discrete) or continuous floats
    discrete: bool = False

    @abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return float64 ``(alpha, sigma)`` for times ``t`` (any shape)."""

    @abstractmethod
    def sample_t(self, n: int, low: float | None = None, high: float | None = None,
                 generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Uniform training times in ``[low, high]`` (inclusive for discrete schedules)."""

    @abstractmethod
    def t_from_edm_sigma(self, sigma_edm: torch.Tensor) -> torch.Tensor:
        """The time whose noise-to-signal ratio ``sigma / alpha`` equals ``sigma_edm``."""

    def time_at(self, fraction: float) -> float:
        """The time at ``fraction`` of the way from clean (0) to pure noise (1), in the schedule's units."""
        return fraction

    def model_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """What the backbone receives as its timestep argument (identity unless overridden)."""
        return t

    # ---------------------------------------------------------------- derived quantities
    def edm_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Noise-to-signal ratio ``sigma / alpha`` (EDM's sigma; Karras et al. 2022, Table 1)."""
        alpha, sigma = self.alpha_sigma(t)
        return sigma / alpha

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` in the dtype of ``x0``."""
        alpha, sigma = self.alpha_sigma(t)
        alpha, sigma = expand_like(alpha, x0).to(x0.dtype), expand_like(sigma, x0).to(x0.dtype)
        return alpha * x0 + sigma * eps

    def to_x0(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Convert a model output of ``prediction_type`` at ``(x_t, t)`` into an x0 prediction."""
        kind = canonical_prediction_type(prediction_type)
        if kind == "sample":
            return output
        alpha, sigma = (expand_like(c, x_t) for c in self.alpha_sigma(t))
        out, x = output.double(), x_t.double()
        if kind == "epsilon":
            x0 = (x - sigma * out) / alpha
        elif kind == "v_prediction":  # v = alpha eps - sigma x0 (Salimans & Ho 2022, Sec. 4)
            x0 = (alpha * x - sigma * out) / (alpha**2 + sigma**2)  # the denominator is 1 for VP
        else:  # flow velocity v = eps - x0 (alpha = 1 - t, sigma = t gives x0 = x_t - t v)
            x0 = (x - sigma * out) / (alpha + sigma)
        return x0.to(output.dtype)

    def from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """Inverse of :meth:`to_x0`: what a model of ``prediction_type`` would output for this x0."""
        kind = canonical_prediction_type(prediction_type)
        if kind == "sample":
            return x0
        eps = self.eps_from_x0(x0, x_t, t)
        if kind == "epsilon":
            return eps
        alpha, sigma = (expand_like(c, x_t) for c in self.alpha_sigma(t))
        if kind == "v_prediction":
            return (alpha * eps.double() - sigma * x0.double()).to(x0.dtype)
        return eps - x0

    def eps_from_x0(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise implied by an x0 prediction: ``eps = (x_t - alpha x0) / sigma``."""
        alpha, sigma = (expand_like(c, x_t) for c in self.alpha_sigma(t))
        return ((x_t.double() - alpha * x0.double()) / sigma).to(x0.dtype)

    def step_to(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM step (Song et al. 2021, Eq. 12 with eta = 0): keep the implied noise.

        ``x_next = alpha(t_next) x0 + sigma(t_next) eps_hat``. For flow schedules this is exactly an
        Euler step of the velocity ODE; for VP it is an Euler step in EDM coordinates ``x / alpha``.
        """
        eps = self.eps_from_x0(x0, x_t, t)
        return self.add_noise(x0, eps, t_next)

    def to(self, device) -> "Schedule":  # schedules hold small tables; kept on CPU and moved per call
        return self


class VPSchedule(Schedule):
    """Discrete DDPM / variance-preserving schedule (Ho et al. 2020), as diffusers' ``DDPMScheduler``.

    Args:
        num_train_timesteps: number of discrete steps (1000 for SD/SDXL).
        beta_start, beta_end: endpoints of the beta schedule.
        beta_schedule: ``"scaled_linear"`` (SD/SDXL: linear in sqrt(beta)) or ``"linear"``.
    """

    discrete = True

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                 beta_schedule: str = "scaled_linear"):
        self.num_train_timesteps = num_train_timesteps
        self.beta_start, self.beta_end, self.beta_schedule = beta_start, beta_end, beta_schedule
        # diffusers builds betas in float32 and takes the cumulative product in float32; we do the same
        # so alphas_cumprod match bit for bit, then hold them in float64 for the conversions.
        if beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r}: use 'scaled_linear' or 'linear'")
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self._abar64 = self.alphas_cumprod.double()

    @classmethod
    def from_scheduler_config(cls, config) -> "VPSchedule":
        """Build from a diffusers scheduler config (dict or FrozenDict)."""
        return cls(num_train_timesteps=config.get("num_train_timesteps", 1000),
                   beta_start=config.get("beta_start", 0.00085), beta_end=config.get("beta_end", 0.012),
                   beta_schedule=config.get("beta_schedule", "scaled_linear"))

    @property
    def t_max(self) -> int:
        return self.num_train_timesteps - 1

    def time_at(self, fraction: float) -> int:
        """Nearest integer timestep: 0.02 -> 20 and 0.98 -> 980 on a 1000-step schedule (DMD2's range)."""
        return min(int(round(fraction * self.num_train_timesteps)), self.t_max)

    def alphas_cumprod_at(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t`` in float64; ``t < 0`` gives 1 (clean data)."""
        t = torch.as_tensor(t)
        table = self._abar64.to(t.device)
        idx = t.long().clamp(0, self.num_train_timesteps - 1)
        return torch.where(t < 0, torch.ones_like(idx, dtype=torch.float64), table[idx])

    def alpha_sigma(self, t):
        abar = self.alphas_cumprod_at(t)
        return abar.sqrt(), (1.0 - abar).sqrt()

    def sample_t(self, n, low=None, high=None, generator=None, device=None):
        low = 0 if low is None else int(low)
        high = self.t_max if high is None else int(high)
        return torch.randint(low, high + 1, (n,), generator=generator, device=device)

    def t_from_edm_sigma(self, sigma_edm):
        """Nearest discrete timestep with ``sqrt((1 - abar) / abar)`` closest to ``sigma_edm``."""
        sigma_edm = torch.as_tensor(sigma_edm, dtype=torch.float64)
        abar = self._abar64.to(sigma_edm.device)  # on the caller's device: no host round trip
        table = ((1 - abar) / abar).sqrt()
        return (table[None, :] - sigma_edm.reshape(-1, 1)).abs().argmin(dim=1).reshape(sigma_edm.shape)

    def inference_timesteps(self, num_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """Sampling timesteps, descending, as diffusers' ``DDIMScheduler.set_timesteps`` makes them.

        ``spacing``: ``"leading"`` (SD/SDXL configs, with ``steps_offset=1``), ``"trailing"`` (starts at 999)
        or ``"linspace"``.
        """
        n = self.num_train_timesteps
        if spacing == "leading":
            ratio = n // num_steps
            steps = (torch.arange(num_steps) * ratio).flip(0) + steps_offset
        elif spacing == "trailing":
            ratio = n / num_steps
            steps = (torch.arange(n, 0, -ratio).round() - 1).long()
        elif spacing == "linspace":
            steps = torch.linspace(0, n - 1, num_steps).round().long().flip(0)
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}")
        return steps.long()

    def ddim_previous(self, timesteps: torch.Tensor, final: str = "clean") -> torch.Tensor:
        """Where each DDIM step lands: ``t - n // num_steps`` (diffusers' rule), the last one at ``final``.

        ``final="clean"`` lands on data (``set_alpha_to_one=True``); ``"zero"`` on timestep 0
        (``set_alpha_to_one=False``, the SD/SDXL configs).
        """
        ratio = self.num_train_timesteps // len(timesteps)
        prev = timesteps - ratio
        floor = -1 if final == "clean" else 0
        return torch.where(prev < 0, torch.full_like(prev, floor), prev)


class FlowSchedule(Schedule):
    """Rectified flow / flow matching: ``x_t = (1 - t) x0 + t eps``, ``t`` in [0, 1], velocity ``eps - x0``.

    Training times are drawn in *unshifted* time ``u`` and mapped through the model's shift,
    ``t = shift_time(u)``: ``"uniform"`` (``u ~ U``, i.e. uniform in shifted time; SD3.5 / FLUX / Sana
    samplers use the same shift at inference) or ``"logit_normal"`` (``u = sigmoid(m + s n)``, SD3's
    training density, Esser et al. 2024, Sec. 3.1, Eq. 19). Ranges (``sample_t``'s ``low``/``high``, a
    method's ``time_range`` through :meth:`time_at`) are actual times ``t``, so a range ``[0.02, 0.98]`` of
    fractions means ``u`` in ``[0.02, 0.98]``, the same units a VP schedule's timesteps 20..980 give.

    Args:
        shift: timestep shift ``s`` (SD3 3.0, Sana 3.0; FLUX's shift depends on the resolution and is
            computed by its adapter, models/backbones/flux.py).
        num_train_timesteps: the backbone receives ``t * num_train_timesteps`` as its timestep.
        time_distribution: ``"uniform"`` or ``"logit_normal"`` (in ``u``, before the shift).
        logit_mean, logit_std: the logit-normal's ``m`` and ``s`` (SD3: 0 and 1).
    """

    def __init__(self, shift: float = 1.0, num_train_timesteps: int = 1000, time_distribution: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0):
        if time_distribution not in ("uniform", "logit_normal"):
            raise ValueError(f"time_distribution must be uniform or logit_normal, got {time_distribution!r}")
        if shift <= 0 or logit_std <= 0:
            raise ValueError(f"shift and logit_std must be positive (got shift={shift}, logit_std={logit_std})")
        self.shift, self.num_train_timesteps = float(shift), num_train_timesteps
        self.time_distribution, self.logit_mean, self.logit_std = time_distribution, logit_mean, logit_std

    def alpha_sigma(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return 1.0 - t, t

    def shift_time(self, t: torch.Tensor) -> torch.Tensor:
        """``t' = s t / (1 + (s - 1) t)`` (SD3, Esser et al. 2024, Sec. 5.3.2)."""
        s = self.shift
        return s * t / (1 + (s - 1) * t)

    def unshift_time(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`shift_time`: ``u = t / (s - (s - 1) t)``."""
        s = self.shift
        return t / (s - (s - 1) * t)

    def time_at(self, fraction: float) -> float:
        """The shifted time at ``fraction`` of the unshifted range (``fraction`` 0.02 -> ``shift_time(0.02)``)."""
        return float(self.shift_time(torch.tensor(float(fraction), dtype=torch.float64)))

    def sample_t(self, n, low=None, high=None, generator=None, device=None):
        """Times in ``[low, high]`` (actual times): ``u`` uniform or logit-normal (truncated) on the unshifted
        range, then :meth:`shift_time`."""
        u_lo = 0.0 if low is None else float(self.unshift_time(torch.tensor(float(low), dtype=torch.float64)))
        u_hi = 1.0 if high is None else float(self.unshift_time(torch.tensor(float(high), dtype=torch.float64)))
        r = torch.rand(n, generator=generator, dtype=torch.float64)
        if self.time_distribution == "uniform":
            u = u_lo + (u_hi - u_lo) * r
        else:  # inverse CDF of the logit-normal truncated to [u_lo, u_hi]
            m, s = self.logit_mean, self.logit_std
            ends = torch.tensor([u_lo, u_hi], dtype=torch.float64).clamp(1e-12, 1 - 1e-12)
            p_lo, p_hi = torch.special.ndtr((torch.logit(ends) - m) / s).tolist()
            p = (p_lo + (p_hi - p_lo) * r).clamp(1e-15, 1 - 1e-15)
            u = torch.sigmoid(m + s * torch.special.ndtri(p)).clamp(u_lo, u_hi)
        return self.shift_time(u).to(device)

    def t_from_edm_sigma(self, sigma_edm):
        sigma_edm = torch.as_tensor(sigma_edm, dtype=torch.float64)
        return sigma_edm / (1 + sigma_edm)

    def model_timestep(self, t):
        return t * self.num_train_timesteps

    def inference_timesteps(self, num_steps: int) -> torch.Tensor:
        """Shifted sigmas as ``FlowMatchEulerDiscreteScheduler.set_timesteps`` makes them (without the final 0).

        diffusers spaces the grid down to the *shifted* smallest training sigma and then shifts again;
        we follow it so that timesteps agree.
        """
        n = self.num_train_timesteps
        lowest = float(self.shift_time(torch.tensor(1.0 / n, dtype=torch.float64)))
        t = torch.linspace(1.0, lowest, num_steps, dtype=torch.float64)
        return self.shift_time(t)


class EDMSchedule(Schedule):
    """EDM / variance exploding: ``x = x0 + sigma eps``; the time is sigma (Karras et al. 2022)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, sigma_data: float = 0.5):
        self.sigma_min, self.sigma_max, self.rho, self.sigma_data = sigma_min, sigma_max, rho, sigma_data

    def alpha_sigma(self, t):
        sigma = torch.as_tensor(t, dtype=torch.float64)
        return torch.ones_like(sigma), sigma

    def karras_sigma(self, u: torch.Tensor) -> torch.Tensor:
        """Karras et al. 2022, Eq. 5: ``u`` in [0, 1] maps sigma_max (u=0) to sigma_min (u=1)."""
        inv_rho = 1.0 / self.rho
        hi, lo = self.sigma_max**inv_rho, self.sigma_min**inv_rho
        return (hi + u * (lo - hi)) ** self.rho

    def karras_u(self, sigma: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`karras_sigma`."""
        inv_rho = 1.0 / self.rho
        hi, lo = self.sigma_max**inv_rho, self.sigma_min**inv_rho
        return (torch.as_tensor(sigma, dtype=torch.float64) ** inv_rho - hi) / (lo - hi)

    def sample_t(self, n, low=None, high=None, generator=None, device=None):
        """Sigmas in ``[low, high]`` spaced as Karras' rho-schedule: ``u`` uniform, ``sigma = karras_sigma(u)``.

        SiD draws ``u ~ U[0, 0.8]``, i.e. ``low = karras_sigma(0.8) = time_at(0.2)``, ``high = sigma_max``.
        """
        u_lo = 0.0 if high is None else float(self.karras_u(high))
        u_hi = 1.0 if low is None else float(self.karras_u(low))
        u = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        return self.karras_sigma(u_lo + (u_hi - u_lo) * u)

    def t_from_edm_sigma(self, sigma_edm):
        return torch.as_tensor(sigma_edm, dtype=torch.float64)

    def time_at(self, fraction: float) -> float:
        """Karras sigma at ``1 - fraction`` (fraction 1 is sigma_max)."""
        return float(self.karras_sigma(torch.tensor(1.0 - fraction, dtype=torch.float64)))

    def inference_timesteps(self, num_steps: int) -> torch.Tensor:
        return self.karras_sigma(torch.linspace(0, 1, num_steps, dtype=torch.float64))


def build_schedule(kind: str = "vp", **kwargs) -> Schedule:
    """Schedule from a config name: ``vp`` / ``ddpm``, ``flow``, ``edm``."""
    kinds = {"vp": VPSchedule, "ddpm": VPSchedule, "flow": FlowSchedule, "edm": EDMSchedule}
    if kind not in kinds:
        raise ValueError(f"unknown schedule {kind!r}; expected one of {sorted(kinds)}")
    return kinds[kind](**kwargs)


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sinusoidal embedding of ``1000 w`` (LCM, Luo et al. 2023, Sec. 4.2; VDM's timestep embedding).

    Equals diffusers' ``get_guidance_scale_embedding(w)`` (which also scales by 1000 inside).
    """
    w = w * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype, device=w.device) * -(math.log(10000.0) / (half - 1)))
    angles = w.to(dtype)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
