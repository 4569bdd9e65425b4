"""Shared machinery of the score-implicit methods, SiD (``sid.py``) and SIM (``sim.py``).

Both train a one-step generator ``x_g = G(z)`` with an online fake score ``f_psi`` of the generator's
distribution, and both differentiate a loss **through the inputs** of the frozen teacher ``f_phi`` and the
frozen fake score (Zhou et al. 2024, "Score identity Distillation", Sec. 3-4; Luo et al. 2024, "One-Step
Diffusion Distillation through Score Implicit Matching", Sec. 3). One iteration (METHODS.md Sec. 3-4):

* generator step: ``x_t = x_g + sigma n`` (EDM units; ``alpha (x_g + sigma n)`` in VP units) at a noise
  level from :meth:`ScoreImplicitMethod.generator_times`; ``y_real = f_phi(x_t)`` (with teacher CFG),
  ``y_fake = f_psi(x_t)`` (fake score frozen, :class:`~distill.methods.base.frozen`); the subclass turns
  ``(x_g, y_real, y_fake, sigma)`` into a per-sample loss. Gradients reach ``x_g`` along three paths: the
  explicit ``x_g`` and the inputs of both networks. Samples with a non-finite value are dropped (SiD).
* fake-score step: the denoising loss on detached generator samples (SiD's EDM loss: lognormal sigma,
  ``P_mean = -1.2``, ``P_std = 1.2``, weight ``1/sigma^2 + 1/sigma_data^2``).

Time distributions (in EDM sigma, mapped to the schedule's own time with ``schedule.t_from_edm_sigma``, the
nearest timestep on a discrete VP schedule):

* ``"karras"`` (SiD): ``u ~ U[0, t_max]`` with ``t_max = 0.8`` (SiD's ``tmax = 800``), and
  ``sigma = (sigma_max^(1/rho) + (1 - u)(sigma_min^(1/rho) - sigma_max^(1/rho)))^rho``, ``rho = 7``; ``u = 0`` is
  ``sigma_min = 0.002`` (clean) and ``u = 0.8`` is sigma 24.4, so the noisiest fifth of Karras' range is
  never used.
* ``"uniform"`` (SiD-LSG, Zhou et al. 2024b): ``t`` uniform over ``time_range`` fractions of the schedule,
  ``[0.02, 0.98]`` = timesteps 20..980.

Update order: the trainer runs the generator step and then the critic step each iteration
(``generator_every = 1``); with ``critic_fresh_sample`` (default) the fake score trains on a sample of the
*updated* generator, so each generator step sees a fake score fitted to the current generator, which is
SiD's "fake step, then generator step" order shifted by half an iteration.

Reduction: the per-sample loss is a mean over the sample's elements, averaged over the batch. SiD's code
sums over elements and multiplies by a loss scale; Adam is invariant to that constant except through
``eps`` and gradient clipping.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from distill.methods.base import Batch, Method, denoising_loss, frozen, generate, pooled_by_time
from distill.models.errors import ToolkitError
from distill.models.roles import FakeScore, Student, Teacher
from distill.models.schedules import EDMSchedule


@dataclass
class ScoreImplicitConfig:
    """Options shared by SiD and SIM (METHODS.md Sec. 3-4)."""

    guidance_scale: float = 1.0  # teacher CFG (SiD-LSG's cfg_eval_real; SiD on class-conditional models: none)
    fake_guidance_eval: float = 1.0  # SiD-LSG's cfg_eval_fake: CFG on the fake score in the generator loss
    fake_guidance_train: float = 1.0  # SiD-LSG's cfg_train_fake: CFG on the fake score in its own loss
    time_distribution: str = "karras"  # "karras" (SiD) or "uniform" (SiD-LSG)
    karras_t_max: float = 0.8  # SiD's tmax / 1000
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    time_range: tuple[float, float] = (0.02, 0.98)  # "uniform": fractions of the schedule (LSG: 20..980)
    # fake-score times: "lognormal" (SiD's EDM loss), "generator" (the generator loss's distribution) or
    # "uniform" over fake_time_range
    fake_time_distribution: str = "lognormal"
    fake_p_mean: float = -1.2
    fake_p_std: float = 1.2
    fake_time_range: tuple[float, float] = (0.0, 1.0)
    fake_weighting: str = "edm"  # denoising_loss weighting: "edm" (SiD), "native", "eps", "v", "x0"
    sigma_data: float = 0.5
    # "sid": divide by mean|x_g - y_real| per sample (detached); "sid_pooled": the same, averaged over the
    # normaliser_pool samples nearest in time (for low-dimensional data, see ScoreImplicitMethod.normaliser); "none"
    normaliser: str = "sid"
    normaliser_pool: int = 32
    generator_every: int = 1
    critic_fresh_sample: bool = True  # fake score trains on the updated generator's sample (SiD's order)
    # (t, n) draws per generator sample: the same estimator with less variance (2-D toys need several)
    noise_draws: int = 1


class _GuidedView:
    """A denoiser evaluated with CFG ``scale``, in the shape ``denoising_loss`` expects."""

    def __init__(self, denoiser, scale: float):
        self.denoiser, self.scale = denoiser, scale
        self.schedule, self.prediction_type = denoiser.schedule, denoiser.prediction_type

    def __call__(self, x_t, t, cond):
        return self.denoiser.guided(x_t, t, cond, self.scale)


def finite_rows(*tensors: torch.Tensor) -> torch.Tensor:
    """[B] bool: samples whose values are all finite in every tensor."""
    keep = torch.ones(tensors[0].shape[0], dtype=torch.bool, device=tensors[0].device)
    for x in tensors:
        keep &= torch.isfinite(x.detach()).flatten(1).all(1)
    return keep


def sample_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over all of a sample's elements: [B, ...] -> [B]."""
    return x.flatten(1).mean(1)


class ScoreImplicitMethod(Method):
    """Base class: time sampling, ``x_t`` construction, frozen two-network evaluation, fake-score loss.

    Subclasses implement :meth:`per_sample_loss`.
    """

    config_class = ScoreImplicitConfig

    def __init__(self, teacher: Teacher, student: Student, fake_score: FakeScore, config: ScoreImplicitConfig):
        if config.time_distribution not in ("karras", "uniform"):
            raise ToolkitError(f"method.time_distribution must be karras or uniform, got {config.time_distribution!r}")
        if config.fake_time_distribution not in ("lognormal", "generator", "uniform"):
            raise ToolkitError("method.fake_time_distribution must be lognormal, generator or uniform, got "
                               f"{config.fake_time_distribution!r}")
        if config.normaliser not in ("sid", "sid_pooled", "none"):
            raise ToolkitError(f"method.normaliser must be sid, sid_pooled or none, got {config.normaliser!r}")
        if config.normaliser_pool < 1:
            raise ToolkitError(f"method.normaliser_pool must be at least 1, got {config.normaliser_pool}")
        if fake_score is None:
            raise ToolkitError("score-implicit methods need a fake score")
        self.teacher, self.student, self.fake_score, self.config = teacher, student, fake_score, config
        self.generator_every = config.generator_every
        self._karras = EDMSchedule(config.sigma_min, config.sigma_max, config.rho)
        self.last_sample = None

    @classmethod
    def from_models(cls, models, config, example_batch: Batch | None = None):
        return cls(models.teacher, models.student, models.fake_score, config)

    @property
    def schedule(self):
        return self.teacher.schedule

    # ------------------------------------------------------------------ times
    def _from_sigma(self, sigma: torch.Tensor, device) -> torch.Tensor:
        return self.schedule.t_from_edm_sigma(sigma).to(device)

    def generator_times(self, rng) -> torch.Tensor:
        """Per-sample times for the generator loss (see the module docstring)."""
        cfg = self.config
        if cfg.time_distribution == "uniform":
            return rng.times(self.schedule, self.schedule.time_at(cfg.time_range[0]),
                             self.schedule.time_at(cfg.time_range[1]))
        u = rng.rand() * cfg.karras_t_max
        return self._from_sigma(self._karras.karras_sigma(1.0 - u), u.device)

    def fake_times(self, rng) -> torch.Tensor:
        cfg = self.config
        if cfg.fake_time_distribution == "generator":
            return self.generator_times(rng)
        if cfg.fake_time_distribution == "uniform":
            return rng.times(self.schedule, *(self.schedule.time_at(f) for f in cfg.fake_time_range))
        n = rng.randn(dtype=torch.float64)
        return self._from_sigma((cfg.fake_p_mean + cfg.fake_p_std * n).exp(), n.device)

    # ------------------------------------------------------------------ losses
    def per_sample_loss(self, x: torch.Tensor, y_real: torch.Tensor, y_fake: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
        """[B] loss from the generator sample ``x`` and both x0 predictions at ``x_t`` (all with gradient)."""
        raise NotImplementedError

    def normaliser(self, x: torch.Tensor, y_real: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """SiD's ``wf = mean_{CHW}|x_g - y_real|`` per sample, detached, at least 1e-5; [B].

        In images the mean runs over ~10^4-10^6 elements and ``wf`` is in effect a function of the noise level
        alone. In 2-D it is a mean of two noisy numbers: samples whose ``|x_g - y_real|`` is small by chance get
        huge weights, and on the 2-D toys SiD then widens every mode by 20-30% (spread 1.26 on five unequal
        modes, against 0.71 with no normaliser). ``"sid_pooled"`` restores the images' behaviour: each
        sample's ``wf`` is averaged over the ``normaliser_pool`` samples of the batch nearest to it in time
        (:func:`pooled_by_time`); on images, where wf already concentrates, pooling changes little.
        """
        cfg = self.config
        if cfg.normaliser == "none":
            return torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        with torch.no_grad():
            wf = sample_mean((x - y_real).abs().float())
            if cfg.normaliser == "sid_pooled":
                if t is None:
                    raise ValueError("the sid_pooled normaliser needs the samples' times")
                wf = pooled_by_time(wf, t, cfg.normaliser_pool)
            return wf.clamp_min(1e-5)

    def edm_sigma(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """EDM sigma (noise-to-signal ratio) at ``t``, float32 [B]."""
        return self.schedule.edm_sigma(t).to(device=like.device, dtype=torch.float32)

    def generator_loss(self, batch: Batch):
        x = generate(self.student, batch)
        self.last_sample = None if self.config.critic_fresh_sample else x.detach()
        draws = self.config.noise_draws
        x_rep = x if draws == 1 else torch.cat([x] * draws)
        cond = batch.cond if draws == 1 or batch.cond is None else batch.cond.repeat(draws)
        t = torch.cat([self.generator_times(batch.rng) for _ in range(draws)])
        noise = torch.cat([batch.rng.randn_like(x) for _ in range(draws)])
        x_t = self.schedule.add_noise(x_rep, noise, t)  # carries the generator's gradient
        with frozen(self.fake_score):
            y_real = self.teacher(x_t, t, cond, self.config.guidance_scale).float()
            y_fake = self.fake_score.denoiser.guided(x_t, t, cond, self.config.fake_guidance_eval).float()
        x_f = x_rep.float()
        keep = finite_rows(x_f, y_real, y_fake)
        dropped = int((~keep).sum())
        if dropped:
            x_f, y_real, y_fake, t = x_f[keep], y_real[keep], y_fake[keep], t[keep]
        if x_f.shape[0] == 0:
            loss = x.float().sum() * 0.0
        else:
            loss = self.per_sample_loss(x_f, y_real, y_fake, t).mean()
        with torch.no_grad():
            gap = sample_mean(((y_real - y_fake) ** 2)).mean() if x_f.shape[0] else torch.zeros(())
        return loss, {"loss_gen": loss.detach(), "score_gap": gap, "nan_dropped": float(dropped)}

    def critic_loss(self, batch: Batch, sample: torch.Tensor | None = None):
        rng = batch.rng.fork(2)
        if sample is None:
            sample = generate(self.student, batch, grad=False)
        x = sample.detach()
        keep = finite_rows(x)
        t = self.fake_times(rng)
        eps = rng.randn_like(x)
        cond = batch.cond
        if not bool(keep.all()):
            x, t, eps = x[keep], t[keep], eps[keep]
            cond = None if cond is None else cond[keep]
        denoiser = self.fake_score.denoiser
        if self.config.fake_guidance_train != 1.0:
            denoiser = _GuidedView(denoiser, self.config.fake_guidance_train)
        loss = denoising_loss(denoiser, x, t, eps, cond, self.config.fake_weighting, self.config.sigma_data)
        return loss, {"loss_fake": loss.detach()}

    # ------------------------------------------------------------------ parameters
    def generator_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def critic_modules(self) -> dict[str, nn.Module]:
        return {"fake_score": self.fake_score}
