"""Periodic sample pictures during training: scatter plots for 2-D toys, image grids otherwise."""
from __future__ import annotations

from pathlib import Path

import torch

from distill.metrics.finite import require_finite
from distill.samplers import sample_student


def decode_to_images(samples: torch.Tensor, models) -> torch.Tensor:
    """Generator outputs -> images in [0, 1]: VAE-decoded for latent students, rescaled from [-1, 1] otherwise.

    Raises :class:`ToolkitError` with the count when latents (or decoded images) hold NaN or inf: a NaN
    latent would otherwise decode to an all-black image without a word.
    """
    pipeline = getattr(models, "pipeline", None)
    vae = getattr(pipeline, "vae", None)
    if vae is not None:
        require_finite(samples, "latents", "the student produced NaN or inf (check the checkpoint or lower --steps)")
        with torch.no_grad():
            latents = samples.to(vae.device, vae.dtype) / vae.config.scaling_factor
            latents = latents + (getattr(vae.config, "shift_factor", None) or 0.0)  # SD3 / FLUX VAEs
            samples = vae.decode(latents).sample.float()
    require_finite(samples, "decoded images" if vae is not None else "samples",
                   "in half precision the VAE can overflow; decode in float32" if vae is not None else "")
    return ((samples.clamp(-1, 1) + 1) / 2).cpu()


def save_images(images: torch.Tensor, folder: str | Path) -> None:
    from torchvision.utils import save_image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, folder / f"{i:05d}.png")


def save_scatter(samples: torch.Tensor, reference: torch.Tensor | None, path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ax.scatter(reference[:, 0], reference[:, 1], s=2, alpha=0.3, label="teacher (true)", c="tab:gray")
    ax.scatter(samples[:, 0], samples[:, 1], s=2, alpha=0.6, label="student", c="tab:blue")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=7, markerscale=4)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def sample_grid_writer(models, config):
    """A ``sample_fn(step, stem)`` for the Trainer, or None when there is nothing cheap to draw."""
    count = config.train.sample_count

    def write(step: int, stem: Path) -> None:
        student = models.student
        device = next(student.parameters()).device
        g = torch.Generator().manual_seed(0)
        z = torch.randn(count, *models.sample_shape, generator=g).to(device)
        cond = None
        if models.mixture is not None and models.conditioner is not None:
            cond = models.conditioner(torch.arange(count) % models.mixture.num_classes).to(device)
        was_training = student.training
        student.eval()
        x = sample_student(student, z, cond).float().cpu()
        student.train(was_training)
        if len(models.sample_shape) == 1 and models.sample_shape[0] == 2:
            ref = models.mixture.sample(count, generator=g) if models.mixture is not None else None
            save_scatter(x, ref, stem.with_suffix(".png"), f"step {step}")
        elif len(models.sample_shape) == 3:
            from torchvision.utils import save_image

            images = decode_to_images(x[:64], models)
            save_image(images, stem.with_suffix(".png"), nrow=8)

    if models.mixture is None and getattr(models, "pipeline", None) is None:
        return None
    if models.mixture is None:  # text-to-image: a grid of the run's first prompts
        return _text_grid_writer(models, config)
    return write


def _text_grid_writer(models, config, max_images: int = 16):
    """Grids of the first ``min(16, sample_count)`` items of ``data.prompts`` (text or cached embeddings), image
    ``i`` from ``torch.Generator().manual_seed(i)`` as ``distill sample`` draws it, so grids of successive steps
    compare the same noise and prompts."""
    import math

    from distill.datasets import prompt_set

    if not config.data.prompts or not config.train.sample_every:
        return None
    prompts = prompt_set(config.data.prompts, models.conditioner, config.data.caption_column)
    n = min(max_images, len(prompts), config.train.sample_count)

    def write(step: int, stem: Path) -> None:
        from torchvision.utils import save_image

        student = models.student
        device = next(student.parameters()).device
        generators = [torch.Generator().manual_seed(i) for i in range(n)]
        z = torch.cat([torch.randn((1, *models.sample_shape), generator=g) for g in generators]).to(device)
        was_training = student.training
        student.eval()
        x = sample_student(student, z, prompts.cond(range(n)).to(device), generator=generators)
        student.train(was_training)
        save_image(decode_to_images(x.float(), models), stem.with_suffix(".png"), nrow=math.ceil(math.sqrt(n)))

    return write
