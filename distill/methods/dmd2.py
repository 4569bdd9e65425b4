"""DMD2: Improved Distribution Matching Distillation (Yin et al. 2024, arXiv:2405.14867).

Generator: the distribution-matching gradient (DMD, Yin et al. 2023, Eq. 7-8), estimated with the
teacher's (real) and the online fake score's x0 predictions at a random noise level,
``grad = (p_real - p_fake) / mean|p_real|`` with ``p = x - x0_pred`` (DMD Eq. 8's per-sample
normaliser), applied through ``0.5 * mse(x, x - grad)``; plus an optional non-saturating GAN term from
a head on the fake score's bottleneck (DMD2 Sec. 4.2). Critic: denoising loss of the fake score on
detached generator samples (DMD2 Sec. 4.1), plus the discriminator loss on noised real and fake data.
Two time-scale update rule: the generator updates every ``generator_every`` iterations.
Multi-step students train with backward simulation (DMD2 Sec. 4.4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from distill.gan import Discriminator, discriminator_gan_loss, generator_gan_loss
from distill.methods.base import Batch, Method, denoising_loss, frozen, generate, no_autocast
from distill.models.roles import FakeScore, Student, Teacher


@dataclass
class DMD2Config:
    """DMD2 knobs (METHODS.md section 2). Times are fractions of the schedule (0 clean, 1 pure noise)."""

    guidance_scale: float = 1.0  # teacher CFG (SDXL 8, SD1.5 1.75, class-conditional none)
    generator_every: int = 5  # TTUR ratio (5 for ImageNet and SDXL, 10 for SD1.5)
    dm_time_range: tuple[float, float] = (0.02, 0.98)
    fake_time_range: tuple[float, float] = (0.0, 1.0)
    fake_weighting: str = "native"  # eps-MSE for eps UNets; "edm" for EDM-style fake scores
    backward_simulation: bool = True
    # (t, eps) draws per generator sample in the DM loss: the same gradient estimate with less variance
    # (one generator forward, ``dm_noise_draws`` teacher / fake-score forwards). 1 is DMD2's setting; small
    # problems (2-D toys) need more, because the normalised per-sample gradient is mostly noise there.
    dm_noise_draws: int = 1
    gan_generator_weight: float = 0.0  # SDXL 5e-3, SD1.5 1e-3, ImageNet 3e-3
    gan_discriminator_weight: float = 0.0  # 1e-2
    gan_feature_module: str | None = None  # default: the UNet's mid_block


def distribution_matching_loss(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor,
                               fake_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * mse(x, x - grad)`` with ``grad = (p_real - fake_weight * p_fake) / mean_{CHW}|p_real|``.

    ``d loss / dx = grad / numel``. ``fake_weight`` is ESD's lambda (1 for DMD). Returns (loss, grad).
    """
    with torch.no_grad():
        p_real = x - x0_real
        p_fake = x - x0_fake
        normaliser = p_real.abs().flatten(1).mean(1).clamp_min(1e-12)
        normaliser = normaliser.reshape(-1, *([1] * (x.ndim - 1)))
        grad = torch.nan_to_num((p_real - fake_weight * p_fake) / normaliser)
    loss = 0.5 * F.mse_loss(x.float(), (x - grad).detach().float())
    return loss, grad


class DMD2(Method):
    """DMD2 over a teacher, a student and a fake score (optionally with a GAN head)."""

    config_class = DMD2Config
    fake_weight: float = 1.0  # lambda in ESD; 1 is DMD

    def __init__(self, teacher: Teacher, student: Student, fake_score: FakeScore, config: DMD2Config,
                 example_batch: Batch | None = None):
        self.teacher, self.student, self.fake_score, self.config = teacher, student, fake_score, config
        self.generator_every = config.generator_every
        self.discriminator: Discriminator | None = None
        if config.gan_generator_weight > 0 or config.gan_discriminator_weight > 0:
            if example_batch is None:
                raise ValueError("the GAN head needs an example batch to size itself")
            x = student.input_from_noise(example_batch.noise)
            t = student.times(0, example_batch.size, x.device)
            self.discriminator = Discriminator(fake_score.denoiser, config.gan_feature_module, x, t,
                                               example_batch.cond)

    @classmethod
    def from_models(cls, models, config: DMD2Config, example_batch: Batch | None = None) -> "DMD2":
        return cls(models.teacher, models.student, models.fake_score, config, example_batch)

    # ------------------------------------------------------------------ helpers
    def _times(self, batch: Batch, time_range) -> torch.Tensor:
        schedule = self.teacher.schedule
        return batch.rng.times(schedule, schedule.time_at(time_range[0]), schedule.time_at(time_range[1]))

    def _gan_logits(self, x0: torch.Tensor, batch: Batch, cond, rng) -> torch.Tensor:
        schedule = self.teacher.schedule
        t = rng.times(schedule, schedule.time_at(0.0), schedule.time_at(1.0))
        return self.discriminator(schedule.add_noise(x0, rng.randn_like(x0), t), t, cond)

    # ------------------------------------------------------------------ losses
    def generator_loss(self, batch: Batch):
        x = generate(self.student, batch, backward_simulation=self.config.backward_simulation)
        self.last_sample = x.detach()
        critic = [self.fake_score] + ([self.discriminator] if self.discriminator is not None else [])
        with frozen(*critic):
            draws = self.config.dm_noise_draws
            x_rep = x if draws == 1 else torch.cat([x] * draws)
            cond = batch.cond if draws == 1 or batch.cond is None else batch.cond.repeat(draws)
            with torch.no_grad():
                t = torch.cat([self._times(batch, self.config.dm_time_range) for _ in range(draws)])
                eps = torch.cat([batch.rng.randn_like(x) for _ in range(draws)])
                x_t = self.teacher.schedule.add_noise(x_rep.detach(), eps, t)
                # fp32, outside autocast (as the reference): the DM gradient is a difference of two close
                # predictions, which bf16 rounding of the fake score would swamp
                with no_autocast(x_t.device):
                    x0_fake = self.fake_score(x_t.float(), t, cond).float()
                x0_real = self.teacher(x_t, t, cond, self.config.guidance_scale).float()
            loss, grad = distribution_matching_loss(x_rep, x0_real, x0_fake, self.fake_weight)
            logs = {"loss_dm": loss.detach(), "dm_grad_norm": grad.flatten(1).norm(dim=1).mean()}
            if self.discriminator is not None and self.config.gan_generator_weight > 0:
                gan = generator_gan_loss(self._gan_logits(x, batch, batch.cond, batch.rng.fork(1)))
                loss = loss + self.config.gan_generator_weight * gan
                logs["loss_g_gan"] = gan.detach()
        return loss, logs

    def critic_loss(self, batch: Batch, sample: torch.Tensor | None = None):
        rng = batch.rng.fork(2)
        if sample is None:
            sample = generate(self.student, batch, grad=False, backward_simulation=self.config.backward_simulation)
        x = sample.detach()
        t = rng.times(self.teacher.schedule, *(self.teacher.schedule.time_at(f) for f in self.config.fake_time_range))
        loss = denoising_loss(self.fake_score.denoiser, x, t, rng.randn_like(x), batch.cond,
                              self.config.fake_weighting)
        logs = {"loss_fake": loss.detach()}
        if self.discriminator is not None and self.config.gan_discriminator_weight > 0:
            if batch.real is None:
                raise ValueError("the GAN discriminator needs real data: configure data.real in the recipe")
            fake_logits = self._gan_logits(x, batch, batch.cond, rng.fork(3))
            real_logits = self._gan_logits(batch.real, batch, batch.real_cond, rng.fork(4))
            d_loss = discriminator_gan_loss(fake_logits, real_logits)
            loss = loss + self.config.gan_discriminator_weight * d_loss
            logs.update(loss_d_gan=d_loss.detach(), d_real=real_logits.mean().detach(),
                        d_fake=fake_logits.mean().detach())
        return loss, logs

    # ------------------------------------------------------------------ parameters
    def generator_modules(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def critic_modules(self) -> dict[str, nn.Module]:
        modules = {"fake_score": self.fake_score}
        if self.discriminator is not None:
            modules["discriminator"] = self.discriminator
        return modules
