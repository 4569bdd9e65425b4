"""Train a recipe on an analytic teacher and measure the student against the known truth.

Shared by tests and benchmarks so both measure the same thing: samples from the student (its EMA when
there is one) against fresh samples of the target distribution, which is the mixture itself, or, when
the recipe uses classifier-free guidance, the teacher's own guided 50-step DDIM samples.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distill.build import build_run, method_config
from distill.config import Config, load_config
from distill.engine import Trainer
from distill.samplers import sample_ddim, sample_student
from distill.metrics.toy import MixtureReport, mode_report


@dataclass
class ToyRun:
    config: Config
    models: object
    trainer: Trainer
    seconds: float


def train_toy(recipe: str | Path | Config, out_dir: str | Path, overrides: list[str] | None = None,
              progress: bool = False) -> ToyRun:
    """Build and train a toy recipe; returns the models and the trainer (time includes the warm start)."""
    config = recipe if isinstance(recipe, Config) else load_config(recipe, overrides)
    start = time.perf_counter()
    models, method, data = build_run(config, progress=progress)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, out_dir,
                      progress=progress)
    trainer.run()
    return ToyRun(config, models, trainer, time.perf_counter() - start)


def guidance_of(config: Config) -> float:
    return float(getattr(method_config(config), "guidance_scale", 1.0))


@torch.no_grad()
def student_samples(run: ToyRun, n: int = 4000, seed: int = 123, label: int | None = None,
                    steps: int | None = None) -> torch.Tensor:
    models = run.models
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, *models.sample_shape, generator=g)
    cond = models.conditioner(torch.full((n,), label)) if label is not None else None
    timesteps = None if steps is None else models.student.timesteps[:steps]
    if run.trainer.ema is not None:
        with run.trainer.ema.swapped():
            return sample_student(models.student, z, cond, timesteps, generator=g)
    return sample_student(models.student, z, cond, timesteps, generator=g)


@torch.no_grad()
def target_samples(run: ToyRun, n: int = 4000, seed: int = 7, label: int | None = None) -> torch.Tensor:
    """The distribution the student should match: the mixture, or the teacher's guided DDIM-50 samples."""
    models = run.models
    g = torch.Generator().manual_seed(seed)
    labels = torch.full((n,), label) if label is not None else None
    w = guidance_of(run.config)
    if w == 1.0:
        return models.mixture.sample(n, class_labels=labels, generator=g)
    cond = models.conditioner(labels) if labels is not None else None
    schedule = models.teacher.schedule
    z = torch.randn(n, *models.sample_shape, generator=g)
    return sample_ddim(models.teacher, z, cond, schedule.inference_timesteps(50, "trailing"), w)


def evaluate(run: ToyRun, n: int = 4000, label: int | None = None, steps: int | None = None) -> MixtureReport:
    """mode_report of the student's samples against target samples (class ``label`` if conditional)."""
    labels = torch.full((n,), label) if label is not None else None
    return mode_report(student_samples(run, n, label=label, steps=steps), run.models.mixture,
                       target_samples(run, n, label=label), class_labels=labels)
