"""Batch sources: data as a pure function of the step, so resume and multi-process runs are exact.

* :class:`ToySource` -- generator noise and class labels for an analytic mixture; real samples drawn from
  the mixture itself (for GAN losses).
* :class:`PromptSource` -- prompts from a text file (one per line), cycled in order; the data position is
  ``step * global_batch``. Optional real latents (precomputed VAE latents, for DMD2's GAN).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from distill.methods.base import Batch, BatchRNG
from distill.models.errors import ToolkitError

_DATA_STREAM = 1_000  # BatchRNG stream reserved for data, apart from the losses' streams


class ToySource:
    """Noise (and labels) for a mixture teacher. ``class_labels`` restricts the classes drawn."""

    def __init__(self, mixture, conditioner, batch_size: int, seed: int = 0,
                 class_labels: Sequence[int] | None = None, with_real: bool = False):
        self.mixture, self.conditioner, self.global_batch_size = mixture, conditioner, batch_size
        self.seed, self.with_real = seed, with_real
        classes = class_labels if class_labels is not None else range(mixture.num_classes)
        self.classes = torch.as_tensor(list(classes), dtype=torch.long)

    def global_labels(self, step: int) -> torch.Tensor | None:
        """Labels for the whole global batch (each process slices its rows)."""
        if self.conditioner is None:
            return None
        rng = BatchRNG(self.seed, step, self.global_batch_size, slice(None)).fork(_DATA_STREAM + 1)
        return self.classes[rng.randint(0, len(self.classes))]

    def __call__(self, step: int, rows: slice, device) -> Batch:
        rng = BatchRNG(self.seed, step, self.global_batch_size, rows, device)
        noise = rng.fork(_DATA_STREAM).randn(*self.mixture.sample_shape)
        labels = self.global_labels(step)
        cond = self.conditioner(labels[rows]).to(device) if labels is not None else None
        real = None
        if self.with_real:
            g = torch.Generator().manual_seed((self.seed * 7919 + step) % 2**63)
            real = self.mixture.sample(self.global_batch_size, class_labels=labels, generator=g)[rows].to(device)
        return Batch(noise=noise, cond=cond, rng=rng, real=real, real_cond=cond)


def read_prompts(path: str | Path) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"prompt file not found: {path} (a text file with one prompt per line)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ToolkitError(f"prompt file {path} has no prompts")
    return prompts


class PromptSource:
    """Prompts cycled in file order; conditioning encoded on the fly by the teacher's conditioner.

    Args:
        latent_shape: shape of one generator input (e.g. (4, 128, 128) for SDXL at 1024 px).
        real_latents: [N, *latent_shape] precomputed VAE latents of real images (GAN), paired with
            ``real_prompts`` (default: the prompts of the same index).
    """

    def __init__(self, prompts: Sequence[str], conditioner, batch_size: int, latent_shape: Sequence[int],
                 seed: int = 0, real_latents: torch.Tensor | None = None, real_prompts: Sequence[str] | None = None):
        self.prompts, self.conditioner, self.global_batch_size = list(prompts), conditioner, batch_size
        self.latent_shape, self.seed = tuple(latent_shape), seed
        self.real_latents, self.real_prompts = real_latents, list(real_prompts or prompts)

    def _take(self, items: list, step: int, rows: slice) -> list:
        start = step * self.global_batch_size
        idx = range(start + (rows.start or 0), start + (rows.stop if rows.stop is not None else self.global_batch_size))
        return [items[i % len(items)] for i in idx]

    def __call__(self, step: int, rows: slice, device) -> Batch:
        rng = BatchRNG(self.seed, step, self.global_batch_size, rows, device)
        noise = rng.fork(_DATA_STREAM).randn(*self.latent_shape)
        cond = self.conditioner(self._take(self.prompts, step, rows)).to(device)
        real = real_cond = None
        if self.real_latents is not None:
            n = self.real_latents.shape[0]
            start = step * self.global_batch_size + (rows.start or 0)
            idx = [(start + i) % n for i in range(noise.shape[0])]
            real = self.real_latents[idx].to(device)
            real_cond = self.conditioner([self.real_prompts[i % len(self.real_prompts)] for i in idx]).to(device)
        return Batch(noise=noise, cond=cond, rng=rng, real=real, real_cond=real_cond)


class LabelSource:
    """Noise and uniform class labels for a class-conditional diffusers teacher (a ``UNet2DModel`` pipeline).

    Args:
        conditioner: a :class:`~models.conditioning.ClassConditioner` (labels -> ``class_labels`` Cond).
        sample_shape: one generator input, e.g. (1, 8, 8) for the digits.
        real: optional ``(images [N, *sample_shape], labels [N])`` of real data (DMD2's GAN, consistency's
            ``data_source: real``); each step draws a batch of them uniformly, labels paired.
        class_labels: restrict the labels drawn (default: all classes).
    """

    def __init__(self, conditioner, batch_size: int, sample_shape: Sequence[int], seed: int = 0,
                 real: tuple[torch.Tensor, torch.Tensor] | None = None, class_labels: Sequence[int] | None = None):
        self.conditioner, self.global_batch_size = conditioner, batch_size
        self.sample_shape, self.seed, self.real = tuple(sample_shape), seed, real
        classes = class_labels if class_labels is not None else range(conditioner.num_classes)
        self.classes = torch.as_tensor(list(classes), dtype=torch.long)
        if real is not None and tuple(real[0].shape[1:]) != self.sample_shape:
            raise ToolkitError(f"real data has samples of shape {tuple(real[0].shape[1:])}, the teacher generates "
                               f"{self.sample_shape}")

    def __call__(self, step: int, rows: slice, device) -> Batch:
        rng = BatchRNG(self.seed, step, self.global_batch_size, rows, device)
        noise = rng.fork(_DATA_STREAM).randn(*self.sample_shape)
        labels = self.classes[rng.fork(_DATA_STREAM + 1).randint(0, len(self.classes)).cpu()]
        cond = self.conditioner(labels).to(device)
        real = real_cond = None
        if self.real is not None:
            idx = rng.fork(_DATA_STREAM + 2).randint(0, len(self.real[0])).cpu()
            real = self.real[0][idx].to(device)
            real_cond = self.conditioner(self.real[1][idx]).to(device)
        return Batch(noise=noise, cond=cond, rng=rng, real=real, real_cond=real_cond)


def load_labelled_images(spec: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images with labels: ``digits`` (scikit-learn's, [-1, 1]) or a ``.safetensors`` with ``images``
    (or ``latents``) ``[N, C, H, W]`` and ``labels`` ``[N]``."""
    if spec == "digits":
        from distill.digits_data import load_digits_tensors

        return load_digits_tensors()
    from safetensors.torch import load_file

    path = Path(spec).expanduser()
    if not path.is_file():
        raise ToolkitError(f"real data not found: {path} (a .safetensors with 'images' and 'labels', or 'digits')")
    tensors = load_file(str(path))
    images = tensors.get("images", tensors.get("latents"))
    if images is None or "labels" not in tensors:
        raise ToolkitError(f"{path} needs 'images' (or 'latents') and 'labels' tensors (found: {', '.join(tensors)})")
    return images.float(), tensors["labels"].long()
