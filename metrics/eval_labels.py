"""``distill eval`` for class-conditional pixel students (the digits): class labels instead of prompts.

A run folder trained with ``data.kind: labels`` or an exported ``UNet2DModel`` student (card kind ``unet2d``)
is class-conditional. Image ``i`` of an evaluation uses label ``labels[i mod L]`` and seed ``SEED + i``;
its initial noise and every re-noise come from its own generator, so an image does not depend on the
batch or the process that makes it. ``--labels`` is a spec (``0-9``, ``3``, ``0,2,4-6``) or a file of such
tokens (whitespace or comma separated); by default every class once, so ``--n`` images are uniform over
the classes. Everything here that :func:`class_model` and :func:`parse_labels` check reads only JSON and
YAML files: no network loads.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from distill.metrics._util import first_line
from distill.metrics.sources import as_rgb_nchw, to_uint8
from distill.models.errors import ToolkitError

LabelGenerator = Callable[[Sequence[int], Sequence[int]], torch.Tensor]


@dataclass
class ClassModel:
    """What ``distill eval`` needs to know of a class-conditional student before loading it."""

    num_classes: int
    digits: bool  # its teacher is the sklearn digits teacher (distill_digits.json): extractor ``digits``
    timesteps: list[int]  # the student's own timesteps (``--steps`` is checked against them)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ToolkitError(f"cannot read {path}: {first_line(err)}") from None


def _pixel_classes(folder: Path) -> tuple[int, bool]:
    """(number of classes, digits teacher?) of a ``UNet2DModel`` pipeline folder, from its JSON files."""
    unet_config = folder / "unet" / "config.json"
    embeds = _read_json(unet_config).get("num_class_embeds") if unet_config.is_file() else None
    if not embeds:
        raise ToolkitError(f"{folder} holds an unconditional pixel model; `distill eval` scores text-to-image "
                           f"(--prompts) and class-conditional (--labels) students")
    meta_path = folder / "distill_digits.json"
    meta = _read_json(meta_path) if meta_path.is_file() else {}
    return int(meta.get("num_classes", int(embeds) - 1)), meta_path.is_file()


def class_model(model: str | os.PathLike, kind: str) -> ClassModel | None:
    """The class-conditional facts of a run or pipeline folder, or None for a text-to-image (or Hub) model."""
    path = Path(model)
    if kind == "run":
        from distill.config import load_config

        config = load_config(path / "config.yaml")
        if config.data.kind != "labels":
            return None
        teacher = Path(os.path.expanduser(str(config.teacher.path)))
        if not teacher.is_dir():
            from distill.models.loading import resolve_pipeline_dir

            teacher = Path(resolve_pipeline_dir(str(config.teacher.path)))
        num_classes, digits = _pixel_classes(teacher)
        return ClassModel(num_classes, digits, [int(t) for t in config.student.timesteps])
    if kind == "pipeline":
        from distill.models.backbones.unet2d import is_unet2d_pipeline
        from distill.models.cards import STUDENT_CARD

        card = _read_json(path / STUDENT_CARD) if (path / STUDENT_CARD).is_file() else {}
        index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
        if card.get("kind") != "unet2d" and not is_unet2d_pipeline(index):
            return None
        if not card.get("timesteps"):
            raise ToolkitError(f"{path} has no {STUDENT_CARD} with the student's timesteps; export the run with "
                               f"`distill export` (class-conditional students are sampled through their card)")
        num_classes, digits = _pixel_classes(path)
        return ClassModel(num_classes, digits, [int(t) for t in card["timesteps"]])
    return None


_TOKEN = re.compile(r"(\d+)(?:-(\d+))?")


def parse_labels(spec: str | None, num_classes: int) -> tuple[list[int], dict]:
    """The labels of ``--labels`` (default every class once) and their description for metrics.json.

    ``spec``: ``"0-9"``, ``"3"``, ``"0,2,4-6"``, or a file of such tokens. Errors name the bad token.
    """
    if spec is None:
        labels, source = list(range(num_classes)), None
    else:
        path = Path(spec)
        text, source = (path.read_text(), str(path)) if path.is_file() else (spec, None)
        labels = []
        for token in (t for t in re.split(r"[\s,]+", text.strip()) if t):
            match = _TOKEN.fullmatch(token)
            if match is None:
                where = f"in {path}" if source else "(not a file either)"
                raise ToolkitError(f"--labels {spec!r}: {token!r} {where} is not a class label or a range A-B "
                                   f"of labels in 0..{num_classes - 1}")
            lo, hi = int(match[1]), int(match[2] if match[2] is not None else match[1])
            if hi < lo:
                raise ToolkitError(f"--labels {spec!r}: the range {token} is empty (write {hi}-{lo})")
            labels += range(lo, hi + 1)
        if not labels:
            raise ToolkitError(f"--labels {spec!r} names no class label")
        bad = sorted({y for y in labels if y >= num_classes})
        if bad:
            raise ToolkitError(f"--labels {spec!r}: label(s) {bad} out of range; this student has classes "
                               f"0..{num_classes - 1}")
    info = {"spec": spec if spec is not None else f"0-{num_classes - 1} (every class, default)", "file": source,
            "count": len(labels), "classes": num_classes,
            "sha256": hashlib.sha256(",".join(map(str, labels)).encode()).hexdigest()}
    return labels, info


def open_class_model(model: str | os.PathLike, kind: str, *, steps: int | None = None, device=None,
                     guidance_scale: float | None = None) -> tuple[LabelGenerator, dict]:
    """``generate(labels, seeds) -> uint8 [B, 3, H, W]`` for a class-conditional run or exported folder,
    and the model's description for metrics.json."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if kind == "run":
        return _run_generator(Path(model), steps, device, guidance_scale)
    return _export_generator(Path(model), steps, device, guidance_scale)


def _images(x: torch.Tensor) -> torch.Tensor:
    """Pixels in [-1, 1] -> uint8 RGB (grey repeated), NaN / inf an error with the count."""
    return as_rgb_nchw(to_uint8(((x.float().clamp(-1, 1) + 1) / 2).cpu(), (0, 1), what="generated images"))


def _run_generator(run: Path, steps: int | None, device: torch.device,
                   guidance_scale: float | None) -> tuple[LabelGenerator, dict]:
    """The run's student through the toolkit's own sampler (``distill sample --label``'s path)."""
    from distill.commands import load_run
    from distill.models.cards import subset_timesteps
    from distill.samplers import sample_student

    config, models = load_run(run, device=device)
    student = models.student.to(device).eval()
    timesteps = subset_timesteps(student.timesteps.tolist(), steps)
    scale = 1.0 if guidance_scale is None else float(guidance_scale)

    def generate(labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        z = torch.cat([torch.randn((1, *models.sample_shape), generator=g) for g in generators]).to(device)
        cond = models.conditioner(torch.tensor(list(labels))).to(device)
        if scale != 1.0:  # an explicit --guidance-scale: CFG against the null label
            x = _guided_run_sample(student, z, cond, timesteps, generators, scale)
        else:
            x = sample_student(student, z, cond, torch.tensor(timesteps, device=device), generator=generators)
        return _images(x)

    return generate, {"kind": "run", "path": str(run), "timesteps": timesteps, "teacher": config.teacher.path,
                      "guidance_scale": scale, "conditioning": "class labels"}


def _guided_run_sample(student, z, cond, timesteps, generators, scale: float) -> torch.Tensor:
    from distill.samplers import _full, _randn_like

    x = student.input_from_noise(z) if hasattr(student, "input_from_noise") else z
    ts = torch.tensor(timesteps, device=z.device)
    for i, t in enumerate(ts):
        x0 = student.guided(x, _full(t, z.shape[0], z.device), cond, scale)
        if i + 1 < len(ts):
            x = student.schedule.add_noise(x0, _randn_like(x0, generators), _full(ts[i + 1], z.shape[0], z.device))
    return x0


def _export_generator(folder: Path, steps: int | None, device: torch.device,
                      guidance_scale: float | None) -> tuple[LabelGenerator, dict]:
    """An exported ``UNet2DModel`` student through diffusers: its UNet and ``LCMScheduler`` with the card's call.

    ``DDPMPipeline`` passes no class labels, so this is the pipeline's loop with ``class_labels``: per-image
    generators for the initial noise and the re-noising (as pipelines draw with a list of generators), and
    classifier-free guidance against the null label when the scale exceeds 1 (as diffusers pipelines do).
    """
    from diffusers import LCMScheduler, UNet2DModel

    from distill.models.backbones.unet2d import class_conditioner
    from distill.models.cards import call_kwargs, load_card

    card = load_card(folder)
    kwargs = call_kwargs(card, steps)
    try:
        unet = UNet2DModel.from_pretrained(str(folder), subfolder="unet").to(device).eval()
        scheduler = LCMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    except Exception as err:
        raise ToolkitError(f"cannot load the student in {folder}: {first_line(err)}") from None
    null = class_conditioner(unet, str(folder)).null_label
    scale = float(card.get("guidance_scale") or 0.0) if guidance_scale is None else float(guidance_scale)
    shape, latents_scale = tuple(card["latent_shape"]), card.get("latents_scale")
    set_kwargs = {k: v for k, v in kwargs.items() if k in ("num_inference_steps", "timesteps")}

    @torch.no_grad()
    def generate(labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        x = torch.cat([torch.randn((1, *shape), generator=g) for g in generators])
        x = (x * latents_scale if latents_scale is not None else x).to(device)
        y = torch.tensor(list(labels), device=device)
        scheduler.set_timesteps(device=device, **set_kwargs)
        denoised = x
        for t in scheduler.timesteps:
            if scale > 1:
                out = unet(torch.cat([x, x]), t, class_labels=torch.cat([torch.full_like(y, null), y])).sample
                uncond, cond = out.chunk(2)
                out = uncond + scale * (cond - uncond)
            else:
                out = unet(x, t, class_labels=y).sample
            x, denoised = scheduler.step(out, t, x, generator=generators, return_dict=False)
        return _images(denoised)

    scheduler.set_timesteps(**set_kwargs)
    return generate, {"kind": "pipeline", "path": str(folder), "timesteps": [int(t) for t in scheduler.timesteps],
                      "guidance_scale": scale, "scheduler": "LCMScheduler", "conditioning": "class labels"}
