"""Consistency distillation along the teacher's DDIM solver (LCM-style).

Consistency models (Song et al. 2023, "Consistency Models", Sec. 4 / Algorithm 2, CD) learn
``f(x_t, t)`` that maps every point of one probability-flow ODE trajectory to the same clean sample, by
minimising ``d(f_theta(x_{t_n}, t_n), f_target(x_hat_{t_{n-k}}, t_{n-k}))`` where ``x_hat`` is one ODE
solver step of the teacher from ``x_{t_n}`` (CD Eq. 7). Latent Consistency Models (Luo et al. 2023,
"Latent Consistency Models", Sec. 4.2-4.3, Algorithm 1) make this work for latent text-to-image
models; this module follows their recipe (METHODS.md Sec. 6; reference: diffusers'
``examples/consistency_distillation``):

* **Skipping-step DDIM solver** (LCM Sec. 4.3): a grid of ``num_ddim_timesteps = 50`` times
  ``t = 19, 39, ..., 999`` (skip ``k = T // 50 = 20``). Per sample an index ``n`` is drawn, ``t_n`` is the
  grid time and the target time is ``t_{n-k} = max(t_n - k, 0)``. On a flow-matching teacher (SD3, FLUX,
  Sana) the grid is ``shift(n / N)``, ``n = 1..N``, with target ``shift((n - 1) / N)`` (down to clean data).
* **Augmented PF-ODE with guidance** (LCM Eq. 9-11): the teacher takes one DDIM step (Song et al. 2021,
  Eq. 12) from ``x_{t_n}`` to ``t_{n-k}`` with classifier-free guidance in LCM's form
  ``x0 = x0_c + w (x0_c - x0_u)``, ``w ~ U[w_min, w_max]`` per sample. In this toolkit's ``guided``
  convention (``x0_u + s (x0_c - x0_u)``) that is the scale ``s = w + 1``; diffusers' pipelines also map
  ``guidance_scale = w + 1`` to the embedding of ``w``. When the student backbone has a
  ``time_cond_proj_dim``, it is conditioned on ``w`` through ``guidance_scale_embedding(w, dim)`` passed as
  ``timestep_cond`` (LCM Sec. 4.2, "w-conditioned"); otherwise (LCM-LoRA, Luo et al. 2023b) ``w`` is still
  drawn per sample and the student learns the average.
* **Boundary condition** (CM Sec. 3, Eq. 3; LCM Eq. 7): ``f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)``
  with ``s = timestep_scaling * t``, ``c_skip = sigma_d^2 / (s^2 + sigma_d^2)``,
  ``c_out = s / sqrt(s^2 + sigma_d^2)``, ``sigma_d = 0.5``, ``timestep_scaling = 10``: exactly what
  diffusers' ``LCMScheduler.step`` applies, so an exported student's raw UNet sampled through
  ``LCMScheduler`` equals :func:`distill.samplers.sample_student` on the :class:`ConsistencyDenoiser` here.
* **Target network** (CM Sec. 4): an EMA of the student (``ema_decay = 0.95``, LCM's ``target_unet``)
  evaluated at ``t_{n-k}``; for LoRA students the online student under ``no_grad`` (LCM-LoRA). The EMA
  target is checkpointed through ``extra_state`` so a resumed run is exact.
* **Distance**: pseudo-Huber ``sqrt((f - f_target)^2 + c^2) - c`` averaged over elements with ``c = 0.001``
  (LCM's ``huber_c``), the iCT form ``sqrt(||f - f_target||^2 + c^2) - c`` per sample with
  ``c = 0.00054 sqrt(d)`` (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models",
  Sec. 3.3), or L2.
* **Index sampling**: uniform over the grid (LCM) or iCT's discretised lognormal
  ``p(n) ~ erf((log sigma(t_n) - P_mean) / (sqrt 2 P_std)) - erf((log sigma(t_{n-k}) - P_mean) / (sqrt 2 P_std))``
  with ``P_mean = -1.1``, ``P_std = 2.0`` (iCT Sec. 3.5), with EDM sigmas ``sqrt((1 - abar) / abar)``.

Where ``x_{t_n}`` comes from: CD noises *data* (``data_source = "real"``: ``batch.real``, i.e. dataset latents
or samples of an analytic mixture). Without data (a prompt file only) ``data_source = "student"`` noises
the student's own multi-step samples (no gradient), a data-free variant: the consistency condition holds
on every ODE trajectory, so any spread of start points is a valid objective; it only changes where the
student is accurate.

Optional iCT loss weighting ``lambda(t_n) = 1 / (sigma(t_n) - sigma(t_{n-k}))`` (iCT Sec. 3.2), normalised to
mean 1 over the grid (``weighting = "ict"``).

Toy students (analytic teachers, ``recipes/toy_ring8_lcm.yaml``): measured on ring8, a student that starts as
the exact teacher's x0 plus a zero-initialised residual MLP (``student.init: teacher``, the analogue of copying
the teacher's weights) beats a fresh MLP (4-step precision 0.91 vs 0.77 at equal cost); for 2-D data L2 beats
LCM's pseudo-Huber with ``c = 0.001`` (effectively L1: 0.91 vs 0.80); iCT's lognormal index sampling adds
~0.03; the EMA decay 0.95 beats 0.99 (slow propagation) and an online target (unstable).

There is no critic (``critic_loss`` returns None, ``needs_fake_score = False``); the method runs in the
same :class:`~distill.engine.Trainer` as DMD2.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from distill.methods.base import Batch, Method
from distill.models.conditioning import Cond
from distill.models.denoiser import Denoiser, _as_batch_times
from distill.models.errors import ToolkitError
from distill.models.schedules import FlowSchedule, expand_like, guidance_scale_embedding


# ---------------------------------------------------------------------------------------------- parameterisation
def boundary_scalings(timestep: torch.Tensor, timestep_scaling: float = 10.0,
                      sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` in float64, as ``LCMScheduler.get_scalings_for_boundary_condition_discrete``.

    ``c_skip(0) = 1`` and ``c_out(0) = 0``, so ``f(x, 0) = x`` (the consistency boundary condition,
    Song et al. 2023, Eq. 3, with EDM's skip/out scalings; LCM scales the discrete timestep by 10 so that
    the condition is sharp: at ``t = 19``, ``c_skip = 1.7e-4``).
    """
    s = torch.as_tensor(timestep).double() * timestep_scaling
    c_skip = sigma_data**2 / (s**2 + sigma_data**2)
    c_out = s / (s**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def guidance_condition_dim(backbone: nn.Module) -> int | None:
    """The backbone's ``time_cond_proj_dim`` (a w-conditioned LCM UNet), or None."""
    config = getattr(backbone, "config", None)
    dim = getattr(config, "time_cond_proj_dim", None) if config is not None else None
    return int(dim) if dim else None


class ConsistencyDenoiser(Denoiser):
    """A consistency function around a diffusion backbone: ``f(x_t, t) = c_skip x_t + c_out x0(x_t, t)``.

    It shares (does not copy) the wrapped denoiser's backbone, so exporting the student writes the raw
    UNet and ``LCMScheduler`` re-applies the same scalings at sampling time. When the backbone is
    w-conditioned (``time_cond_proj_dim``) and the conditioning carries no ``timestep_cond``, the
    embedding of ``guidance_w`` is passed (diffusers' pipelines pass that of ``guidance_scale - 1``).

    Args:
        denoiser: the x0 denoiser to wrap (its backbone, schedule and prediction type are reused).
        timestep_scaling, sigma_data: LCM's boundary scalings (10 and 0.5, as ``LCMScheduler``).
        guidance_w: the guidance ``w`` the student is conditioned on when sampling.
    """

    def __init__(self, denoiser: Denoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5,
                 guidance_w: float = 0.0):
        super().__init__(denoiser.backbone, denoiser.schedule, denoiser.prediction_type)
        self.timestep_scaling, self.sigma_data, self.guidance_w = timestep_scaling, sigma_data, guidance_w

    @property
    def guidance_dim(self) -> int | None:
        return guidance_condition_dim(self.backbone)

    def with_guidance(self, cond: Cond | None, w: torch.Tensor | float | None, batch: int, device) -> Cond:
        """``cond`` (conditional branch only) plus ``timestep_cond = embedding(w)`` when the backbone takes it."""
        kwargs = dict(cond.kwargs) if cond is not None else {}
        dim = self.guidance_dim
        if dim is not None and "timestep_cond" not in kwargs:
            w = self.guidance_w if w is None else w
            w = torch.as_tensor(w, dtype=torch.float32, device=device).expand(batch)
            kwargs["timestep_cond"] = guidance_scale_embedding(w, dim).to(device)
        return Cond(kwargs)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        t = _as_batch_times(t, x_t.shape[0], x_t.device)
        x0 = super().forward(x_t, t, self.with_guidance(cond, None, x_t.shape[0], x_t.device))
        c_skip, c_out = boundary_scalings(self.schedule.model_timestep(t), self.timestep_scaling, self.sigma_data)
        c_skip, c_out = expand_like(c_skip, x_t).to(x_t.dtype), expand_like(c_out, x_t).to(x_t.dtype)
        return c_skip * x_t + c_out * x0

    def guided(self, x_t, t, cond, scale):  # a consistency student is never guided at sampling time
        return self(x_t, t, cond)


def as_consistency_denoiser(denoiser: Denoiser, timestep_scaling: float = 10.0, sigma_data: float = 0.5,
                            guidance_w: float = 0.0) -> ConsistencyDenoiser:
    """Wrap ``denoiser`` (idempotent: an existing wrapper gets the new settings)."""
    if isinstance(denoiser, ConsistencyDenoiser):
        denoiser.timestep_scaling, denoiser.sigma_data, denoiser.guidance_w = timestep_scaling, sigma_data, guidance_w
        return denoiser
    return ConsistencyDenoiser(denoiser, timestep_scaling, sigma_data, guidance_w)


# ---------------------------------------------------------------------------------------------- config
@dataclass
class ConsistencyConfig:
    """Consistency-distillation knobs (METHODS.md Sec. 6). Defaults are LCM's (diffusers' LCM scripts)."""

    num_ddim_timesteps: int = 50  # solver grid; skip k = T // num_ddim_timesteps
    w_min: float = 3.0  # teacher CFG w ~ U[w_min, w_max], LCM form x0_c + w (x0_c - x0_u)
    w_max: float = 15.0
    sample_w: float | None = None  # w the student is conditioned on when sampling; None: (w_min + w_max) / 2
    timestep_scaling: float = 10.0
    sigma_data: float = 0.5
    target: str = "auto"  # "ema" (LCM), "online" (student under no_grad; LCM-LoRA), "auto": online for LoRA
    ema_decay: float = 0.95
    loss: str = "huber"  # "huber" (element-wise, c = huber_c), "huber_ict" (per-sample norm), "l2"
    huber_c: float | None = 0.001  # None with "huber_ict": c = 0.00054 sqrt(d) (iCT Sec. 3.3)
    index_sampling: str = "uniform"  # "uniform" (LCM) or "lognormal" (iCT Sec. 3.5)
    p_mean: float = -1.1
    p_std: float = 2.0
    weighting: str = "none"  # "none" (LCM) or "ict": lambda = 1 / (sigma(t_n) - sigma(t_{n-k})) (iCT Sec. 3.2)
    data_source: str = "real"  # "real" (batch.real: data latents / mixture samples) or "student" (data-free)


_LOSSES = ("huber", "huber_ict", "l2")


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, loss: str = "huber",
                         huber_c: float | None = 0.001, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean distance between the student's and the target's consistency outputs.

    ``huber``: ``mean(sqrt((a - b)^2 + c^2) - c)`` element-wise (LCM); ``huber_ict``: per sample
    ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(d)`` when ``huber_c`` is None (iCT); ``l2``: MSE.
    """
    diff = (pred.float() - target.float()).flatten(1)
    if loss == "l2":
        per_sample = diff.pow(2).mean(1)
    elif loss == "huber":
        c = 0.001 if huber_c is None else float(huber_c)
        per_sample = ((diff.pow(2) + c**2).sqrt() - c).mean(1)
    elif loss == "huber_ict":
        c = 0.00054 * math.sqrt(diff.shape[1]) if huber_c is None else float(huber_c)
        per_sample = (diff.pow(2).sum(1) + c**2).sqrt() - c
    else:
        raise ValueError(f"unknown consistency loss {loss!r}; expected one of {_LOSSES}")
    if weight is not None:
        per_sample = per_sample * weight.to(per_sample.dtype)
    return per_sample.mean()


# ---------------------------------------------------------------------------------------------- method
class ConsistencyDistillation(Method):
    """LCM-style consistency distillation of ``teacher`` into ``student`` (see the module docstring)."""

    config_class = ConsistencyConfig
    needs_fake_score = False

    def __init__(self, teacher, student, config: ConsistencyConfig):
        for name, allowed in (("loss", _LOSSES), ("index_sampling", ("uniform", "lognormal")),
                              ("data_source", ("real", "student")), ("target", ("auto", "ema", "online")),
                              ("weighting", ("none", "ict"))):
            if getattr(config, name) not in allowed:
                raise ToolkitError(f"method.{name} must be one of {', '.join(allowed)}, got {getattr(config, name)!r}")
        if config.w_min > config.w_max:
            raise ToolkitError(f"method.w_min ({config.w_min}) must not exceed method.w_max ({config.w_max})")
        schedule = teacher.schedule
        flow = isinstance(schedule, FlowSchedule)
        if not getattr(schedule, "discrete", False) and not flow:
            raise ToolkitError("consistency distillation runs on the discrete DDPM/VP schedule (SD, SDXL, toys) or a "
                               "flow-matching schedule (SD3, FLUX, Sana)")
        self.teacher, self.student, self.config = teacher, student, config
        self.prepare_student(student, config)
        N = config.num_ddim_timesteps
        if flow:
            # flow teachers: N Euler intervals, uniform in unshifted time and mapped through the teacher's shift
            # (the grid its own sampler uses), ending at t = 0 (clean)
            u = torch.arange(0, N + 1, dtype=torch.float64) / N
            self.grid, self.grid_prev = schedule.shift_time(u[1:]), schedule.shift_time(u[:-1])
        else:
            self.skip = schedule.num_train_timesteps // N
            # diffusers' DDIMSolver grid: (1..N) * k - 1 = 19, 39, ..., 999
            self.grid = torch.arange(1, N + 1, dtype=torch.long) * self.skip - 1
            self.grid_prev = (self.grid - self.skip).clamp_min(0)
        self.index_cdf = self._index_cdf(schedule) if config.index_sampling == "lognormal" else None
        self.loss_weight = None
        if config.weighting == "ict":  # normalised to mean 1 over the grid
            sigma = schedule.edm_sigma(self.grid) - schedule.edm_sigma(self.grid_prev)
            self.loss_weight = (1.0 / sigma) / (1.0 / sigma).mean()
        target = config.target
        if target == "auto":
            target = "online" if _has_lora(student) else "ema"
        self.target_kind = target
        self.target: ConsistencyDenoiser | None = None
        if target == "ema":
            self.target = copy.deepcopy(student.denoiser)
            self.target.requires_grad_(False)
            self.target.eval()
            self._ema_names = [n for n, p in student.denoiser.named_parameters() if p.requires_grad]

    @classmethod
    def from_models(cls, models, config: ConsistencyConfig, example_batch: Batch | None = None):
        return cls(models.teacher, models.student, config)

    @staticmethod
    def prepare_student(student, config: ConsistencyConfig) -> None:
        """Put the boundary scalings (and the sampling ``w``) into the student's denoiser, in place.

        Called by :func:`distill.build.build_models` as well, so a student rebuilt for sampling or export
        from a run folder is the same consistency function.
        """
        w = config.sample_w if config.sample_w is not None else 0.5 * (config.w_min + config.w_max)
        student.denoiser = as_consistency_denoiser(student.denoiser, config.timestep_scaling, config.sigma_data, w)

    # ------------------------------------------------------------------ helpers
    def _index_cdf(self, schedule) -> torch.Tensor:
        """Cumulative iCT lognormal probabilities of the grid intervals ``(t_{n-k}, t_n]``."""
        c = self.config
        hi = schedule.edm_sigma(self.grid).log()
        lo = schedule.edm_sigma(self.grid_prev).log()
        erf = lambda s: torch.erf((s - c.p_mean) / (math.sqrt(2.0) * c.p_std))  # noqa: E731
        p = (erf(hi) - erf(lo)).clamp_min(0)
        return (p / p.sum()).cumsum(0)

    def sample_index(self, batch: Batch) -> torch.Tensor:
        if self.index_cdf is None:
            return batch.rng.randint(0, len(self.grid))
        u = batch.rng.rand()
        return torch.searchsorted(self.index_cdf.to(u.device), u).clamp_max(len(self.grid) - 1)

    def teacher_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None, w: torch.Tensor) -> torch.Tensor:
        """Guided teacher x0 in LCM form ``x0_c + w (x0_c - x0_u)`` (one batched forward), float32."""
        den = self.teacher.denoiser
        # w is 0 for every sample exactly when w_min = w_max = 0 (decided from the config: no device read)
        if cond is None or cond.uncond is None or (self.config.w_min == 0 and self.config.w_max == 0):
            return den(x_t, t, cond).float()
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        out = den.raw(x2, t2, cond.cfg_batch()).to(x_t.dtype)
        x0_u, x0_c = den.schedule.to_x0(out, x2, t2, den.prediction_type).float().chunk(2)
        w = expand_like(w.to(x0_c.dtype), x0_c)
        return x0_c + w * (x0_c - x0_u)

    def _start_data(self, batch: Batch, w: torch.Tensor) -> torch.Tensor:
        if self.config.data_source == "real":
            if batch.real is None:
                raise ToolkitError("consistency distillation with method.data_source=real needs data: a toy "
                                   "teacher's samples or data.real latents; or set method.data_source=student")
            return batch.real.float()
        # data-free: the student's own multi-step sample (no gradient), with the same w as the loss
        rng = batch.rng.fork(5)
        student = self.student
        cond = student.denoiser.with_guidance(batch.cond, w, batch.size, batch.noise.device)
        with torch.no_grad():
            x = student.input_from_noise(batch.noise)
            for i in range(student.num_steps):
                x0 = student.denoiser(x, student.times(i, batch.size, x.device), cond)
                if i + 1 < student.num_steps:
                    x = student.schedule.add_noise(x0, rng.randn_like(x0), student.times(i + 1, batch.size, x.device))
        return x0.float()

    # ------------------------------------------------------------------ losses
    def generator_loss(self, batch: Batch):
        c, schedule = self.config, self.teacher.schedule
        device = batch.noise.device
        w = (c.w_min + (c.w_max - c.w_min) * batch.rng.rand()).float()
        index = self.sample_index(batch)
        t_n = self.grid.to(device)[index]
        t_prev = self.grid_prev.to(device)[index]
        x0 = self._start_data(batch, w)
        x_t = schedule.add_noise(x0, batch.rng.randn_like(x0), t_n)

        student = self.student.denoiser
        student_cond = student.with_guidance(batch.cond, w, batch.size, device)
        f_student = student(x_t, t_n, student_cond)
        with torch.no_grad():
            x0_teacher = self.teacher_x0(x_t, t_n, batch.cond, w)
            x_prev = schedule.step_to(x0_teacher, x_t.float(), t_n, t_prev)  # DDIM (eta = 0), LCM Eq. 11
            target = self.target if self.target is not None else student
            f_target = target(x_prev, t_prev, student_cond)
        weight = self.loss_weight[index.cpu()].to(device) if self.loss_weight is not None else None
        loss = consistency_distance(f_student, f_target, c.loss, c.huber_c, weight)
        logs = {"loss_cd": loss.detach(), "t_n_mean": t_n.double().mean()}
        return loss, logs

    # ------------------------------------------------------------------ target network
    @torch.no_grad()
    def on_generator_step(self, step: int) -> None:
        """``theta^- <- mu theta^- + (1 - mu) theta`` (CM Algorithm 2; LCM's ``target_unet``, mu = 0.95)."""
        if self.target is None:
            return
        online = dict(self.student.denoiser.named_parameters())
        target = dict(self.target.named_parameters())
        for name in self._ema_names:
            target[name].lerp_(online[name].detach().to(target[name].dtype), 1.0 - self.config.ema_decay)

    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.target is None:
            return {}
        target = dict(self.target.named_parameters())
        return {f"target.{n}": target[n].detach() for n in self._ema_names}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.target is None:
            return
        target = dict(self.target.named_parameters())
        missing = [n for n in self._ema_names if f"target.{n}" not in state]
        if missing:
            raise ToolkitError(f"checkpoint has no EMA target for {len(missing)} parameters, e.g. {missing[0]}")
        with torch.no_grad():
            for name in self._ema_names:
                target[name].copy_(state[f"target.{name}"])

    # ------------------------------------------------------------------ parameters
    def generator_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}


def _has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


__all__ = ["ConsistencyConfig", "ConsistencyDenoiser", "ConsistencyDistillation", "as_consistency_denoiser",
           "boundary_scalings", "consistency_distance", "guidance_condition_dim"]
