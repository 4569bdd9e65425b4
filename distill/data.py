"""Batch sources: data as a pure function of the step, so resume and multi-process runs are exact.

* :class:`ToySource` -- generator noise and class labels for an analytic mixture; real samples drawn from
  the mixture itself (for GAN losses).
* :class:`PromptSource` -- prompts (a prompt file, or cached embeddings from ``distill encode-prompts``),
  cycled in order; the data position is ``step * global_batch``. Optional real latents with captions (a
  ``distill encode-latents`` folder, an image folder, or a latent file; :mod:`distill.datasets`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from distill.methods.base import Batch, BatchRNG
from distill.prompt_files import read_prompts  # noqa: F401  (re-exported: prompt files of every format)

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


class PromptSource:
    """Prompts cycled in order; item ``i`` of step ``s`` is ``(s * global_batch + i) mod len(prompts)``.

    Args:
        prompts: a prompt set (:mod:`distill.datasets`: text encoded on the fly, or cached embeddings read
            lazily) or a list of strings (encoded by ``conditioner``).
        latent_shape: shape of one generator input (e.g. (4, 128, 128) for SDXL at 1024 px).
        real: real latents with their captions (GAN, consistency on real data): a real set from
            :func:`distill.datasets.real_set`, or a ``[N, *latent_shape]`` tensor paired with ``real_prompts``
            (default: the prompts of the same index). Cycled the same way as the prompts.
    """

    def __init__(self, prompts, conditioner, batch_size: int, latent_shape: Sequence[int], seed: int = 0,
                 real_latents=None, real_prompts: Sequence[str] | None = None):
        from distill.datasets import InMemoryLatents, TextPrompts

        if isinstance(prompts, (list, tuple)):
            prompts = TextPrompts(prompts, conditioner)
        if isinstance(real_latents, torch.Tensor):
            real_latents = InMemoryLatents(real_latents, real_prompts, conditioner, prompts)
        self.prompts, self.conditioner, self.global_batch_size = prompts, conditioner, batch_size
        self.latent_shape, self.seed, self.real = tuple(latent_shape), seed, real_latents

    def _indices(self, step: int, rows: slice, n: int) -> list[int]:
        start = step * self.global_batch_size + (rows.start or 0)
        stop = step * self.global_batch_size + (rows.stop if rows.stop is not None else self.global_batch_size)
        return [i % n for i in range(start, stop)]

    def __call__(self, step: int, rows: slice, device) -> Batch:
        rng = BatchRNG(self.seed, step, self.global_batch_size, rows, device)
        noise = rng.fork(_DATA_STREAM).randn(*self.latent_shape)
        cond = self.prompts.cond(self._indices(step, rows, len(self.prompts))).to(device)
        real = real_cond = None
        if self.real is not None:
            real, real_cond = self.real.get(self._indices(step, rows, len(self.real)))
            real, real_cond = real.to(device), real_cond.to(device)
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
        host = BatchRNG(self.seed, step, self.global_batch_size, rows)  # same draws, kept on the host: they index
        labels = self.classes[host.fork(_DATA_STREAM + 1).randint(0, len(self.classes))]  # host tensors
        cond = self.conditioner(labels).to(device)
        real = real_cond = None
        if self.real is not None:
            idx = host.fork(_DATA_STREAM + 2).randint(0, len(self.real[0]))
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
