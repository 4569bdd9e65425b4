"""``distill sample`` for text-to-image students: from a run folder or from an exported folder, same images.

Image ``i`` uses its own generator ``torch.Generator().manual_seed(seed + i)`` for its initial noise and
every re-noise, as diffusers' pipelines do with a list of generators, so an image does not depend on the
batch it was drawn in, and the call written in an export's card reproduces it
(:mod:`distill.models.cards`). ``--steps K`` takes K of the student's timesteps, evenly spaced by index
as ``LCMScheduler`` picks them.

Output folder::

    OUT/images/00000.png ...   one PNG per prompt, named by the prompt's index
    OUT/prompts.txt            line i is the prompt of images/i.png (``distill clip OUT/images OUT/prompts.txt``)
    OUT/grid.png               all images in one grid
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from distill.models.errors import ToolkitError


def sample_run_images(models, prompts: Sequence[str], seed: int = 0, steps: int | None = None,
                      batch_size: int = 8, device: str | torch.device = "cpu") -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] from a run's student (:func:`distill.commands.load_run`)."""
    from distill.models.cards import subset_timesteps
    from distill.sample_grids import decode_to_images
    from distill.samplers import sample_student

    student = models.student.to(device).eval()
    timesteps = subset_timesteps(student.timesteps.tolist(), steps)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        z = torch.cat([torch.randn((1, *models.sample_shape), generator=g) for g in generators]).to(device)
        cond = models.conditioner(chunk).to(device)
        x = sample_student(student, z, cond, torch.tensor(timesteps, device=device), generator=generators)
        out.append(decode_to_images(x, models))
    return torch.cat(out)


def sample_export_images(folder: str | Path, card: dict, prompts: Sequence[str], seed: int = 0,
                         steps: int | None = None, batch_size: int = 8,
                         device: str | torch.device = "cpu") -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [0, 1] from an exported folder, through the call its card names."""
    from distill.models.cards import pipeline_from_card, run_card

    pipe = pipeline_from_card(card, folder, device)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        seeds = [seed + start + i for i in range(len(chunk))]
        out.append(run_card(pipe, card, chunk, seeds, steps).float().cpu())
    return torch.cat(out)


def write_sample_folder(images: torch.Tensor, prompts: Sequence[str], out: str | Path) -> Path:
    """Write ``images/NNNNN.png``, ``prompts.txt`` and ``grid.png`` under ``out``."""
    from torchvision.utils import save_image

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        save_image(image, out / "images" / f"{i:05d}.png")
    (out / "prompts.txt").write_text("".join(p.replace("\n", " ") + "\n" for p in prompts), encoding="utf-8")
    save_image(images, out / "grid.png", nrow=max(1, math.ceil(math.sqrt(len(images)))))
    return out


def text_prompts(args) -> list[str]:
    """Prompts from ``--prompts FILE`` (any prompt file format) or ``--prompt P`` repeated ``--n`` times."""
    from distill.prompt_files import read_prompts

    if getattr(args, "prompts", None):
        if args.prompt is not None:
            raise ToolkitError("pass either --prompts FILE or --prompt P, not both")
        return read_prompts(args.prompts)
    if args.prompt is None:
        raise ToolkitError("text-to-image students need --prompts FILE (or --prompt P with --n)")
    return [args.prompt] * args.n


def _device(name: str | None) -> torch.device:
    """The checked ``--device`` (distill.cli_checks), or this process's GPU when there is one, else the CPU."""
    from distill import cli_checks
    from distill.parallel import default_device

    return default_device(cli_checks.device(name))


def _run_timesteps(run: str | Path) -> list[int]:
    from distill.config import load_config

    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise ToolkitError(f"{run} is neither a run folder (no config.yaml) nor an exported student "
                           f"(no distill_student.json)")
    return [int(t) for t in load_config(path).student.timesteps]


def _check_steps(steps: int | None, timesteps: list[int]) -> None:
    """``--steps`` against the student's timesteps, before any model loads."""
    from distill.models.cards import subset_timesteps

    subset_timesteps(timesteps, steps)


def cmd_sample_text(args, run_or_export: str | Path) -> int:
    """``distill sample`` for a text-to-image run folder or exported folder (see the module docstring)."""
    from distill.models.cards import load_card

    if args.batch_size <= 0:
        raise ToolkitError("--batch-size must be positive")
    device = _device(args.device)
    prompts = text_prompts(args)
    card = load_card(run_or_export)
    _check_steps(args.steps, card["timesteps"] if card is not None else _run_timesteps(run_or_export))
    if card is not None:
        images = sample_export_images(run_or_export, card, prompts, args.seed, args.steps, args.batch_size, device)
    else:
        from distill.commands import load_run

        _, models = load_run(run_or_export, use_ema=not args.no_ema, device=device)
        if models.pipeline is None:
            raise ToolkitError("--prompts needs a text-to-image student (an sdxl / sd15 teacher)")
        images = sample_run_images(models, prompts, args.seed, args.steps, args.batch_size, device)
    out = write_sample_folder(images, prompts, args.out)
    print(f"wrote {len(prompts)} images to {out / 'images'}/, {out / 'grid.png'} and {out / 'prompts.txt'}")
    return 0
