"""Model cards that follow themselves: the exact diffusers call that reproduces a distilled student.

An exported student (``distill export``) carries ``distill_student.json`` and a ``README.md`` model card.
Both are written from ONE dictionary of call arguments (:func:`build_card`), and ``distill sample EXPORT``
runs that same dictionary (:func:`pipeline_from_card`, :func:`run_card`), so the card, the code sample in
it and the sampler cannot drift apart. What the call pins down, and why:

* **Scheduler**: ``LCMScheduler`` (predict x0, re-noise with fresh noise; METHODS.md Sec. 1) at the student's
  timesteps: ``num_inference_steps=N`` when ``original_inference_steps`` makes the scheduler produce exactly
  those timesteps, else ``timesteps=[...]``.
* **Boundary scalings**: ``LCMScheduler`` outputs ``c_skip x_t + c_out x0`` with
  ``c_skip = 0.25 / ((t s)^2 + 0.25)`` (``s = timestep_scaling``; ``sigma_data`` is fixed at 0.5 there).
  A consistency student was trained with ``(timestep_scaling, sigma_data)``; its scalings depend on
  ``t * timestep_scaling / sigma_data`` only, so the exported ``timestep_scaling`` is
  ``timestep_scaling * 0.5 / sigma_data`` (exact). DMD2 / SiD / SIM / ESD students output their x0
  prediction: ``timestep_scaling = 1e6`` makes ``c_skip < 3e-13`` and ``c_out = 1`` in float32 for t >= 1
  (the teacher's default 10 would leave ``c_skip = 4e-8`` at t = 249).
* **Guidance**: always explicit, never the pipeline default (5.0 for SDXL, 7.5 for SD1.5, which would
  apply CFG to a distilled student at twice the cost): 0 for DMD2 / SiD / SIM / ESD students (their
  teacher's CFG is distilled in); ``w + 1`` for a w-conditioned LCM student (pipelines embed
  ``guidance_scale - 1``); 1 for LCM-LoRA and other consistency students without a guidance embedding
  (Luo et al. 2023b use no CFG; values <= 1 switch the pipeline's CFG off).
* **Size**: ``height`` / ``width`` of the trained resolution; SDXL's micro-conditioning
  (``original_size`` / ``target_size``) when the run conditioned on another size.
* **Initial noise**: students fed ``sigma(t*) z`` (SiD's ``noise_scale: sigma``) get ``latents=`` scaled
  by that sigma, drawn from the same generator.
* **Seeds**: image ``i`` of ``distill sample --seed S`` is the call with ``torch.Generator().manual_seed(S + i)``.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np
import torch

from distill.models.errors import ToolkitError

STUDENT_CARD = "distill_student.json"
PIPELINE_CLASSES = {"sdxl": "StableDiffusionXLPipeline", "sd15": "StableDiffusionPipeline",
                    "unet2d": "DDPMPipeline"}  # pixel-space UNet2DModel teachers (the digits demo)
#: LCMScheduler's boundary condition switched off for students that output their x0 prediction
NO_BOUNDARY_TIMESTEP_SCALING = 1.0e6
LCM_SIGMA_DATA = 0.5  # hard-coded in diffusers' LCMScheduler.get_scalings_for_boundary_condition_discrete
FORMATS = ("pipeline", "unet", "lora")


def subset_timesteps(timesteps: Sequence[int], steps: int | None) -> list[int]:
    """The student's timesteps for a ``steps``-step sample: evenly spaced indices, as ``LCMScheduler`` picks them.

    ``floor(linspace(0, N, K, endpoint=False))`` of the N trained timesteps; K = N (or None) is all of them.
    """
    timesteps = [int(t) for t in timesteps]
    if steps is None or steps == len(timesteps):
        return timesteps
    if not 1 <= steps <= len(timesteps):
        raise ToolkitError(f"--steps must be between 1 and {len(timesteps)} (the student's timesteps {timesteps})")
    idx = np.floor(np.linspace(0, len(timesteps), num=steps, endpoint=False)).astype(np.int64)
    return [timesteps[i] for i in idx]


def student_guidance_scale(method: str, unet, student) -> float:
    """The pipeline ``guidance_scale`` that reproduces the student (see the module docstring)."""
    if method == "consistency":
        if getattr(unet.config, "time_cond_proj_dim", None) and hasattr(student.denoiser, "guidance_w"):
            return float(student.denoiser.guidance_w) + 1.0
        return 1.0
    return 0.0


def student_timestep_scaling(student) -> float:
    """``LCMScheduler.timestep_scaling`` giving the student's own boundary scalings (see the module docstring)."""
    denoiser = student.denoiser
    if hasattr(denoiser, "timestep_scaling") and hasattr(denoiser, "sigma_data"):
        return float(denoiser.timestep_scaling) * LCM_SIGMA_DATA / float(denoiser.sigma_data)
    return NO_BOUNDARY_TIMESTEP_SCALING


def lcm_config_for(teacher_scheduler_config: dict, timesteps: Sequence[int], timestep_scaling: float) -> tuple[dict, bool]:
    """An ``LCMScheduler`` config (without ``_`` keys) for the student; ``exact``: see ``lcm_scheduler_config``."""
    from distill.models.export import lcm_scheduler_config

    config, exact = lcm_scheduler_config(teacher_scheduler_config, timesteps)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config["timestep_scaling"] = float(timestep_scaling)
    return config, exact


def _steps_kwargs(scheduler_config: dict, timesteps: list[int], exact: bool, steps: int) -> dict:
    """``num_inference_steps=K`` when the scheduler alone gives the K-step subset, else ``timesteps=[...]``."""
    from diffusers import LCMScheduler

    wanted = subset_timesteps(timesteps, steps)
    if exact:
        scheduler = LCMScheduler.from_config(scheduler_config)
        scheduler.set_timesteps(steps)
        if scheduler.timesteps.tolist() == wanted:
            return {"num_inference_steps": steps}
    return {"timesteps": wanted}


def build_card(*, kind: str, fmt: str, method: str, timesteps: Sequence[int], guidance_scale: float,
               scheduler_config: dict, exact: bool, height: int, width: int, latent_shape: Sequence[int],
               teacher: str, micro_size: tuple[int, int] | None = None, latents_scale: float | None = None,
               lora: bool = False) -> dict:
    """The card dictionary: one source for ``distill_student.json``, the README code and ``distill sample EXPORT``."""
    if fmt not in FORMATS:
        raise ToolkitError(f"unknown export format {fmt!r}; expected one of {', '.join(FORMATS)}")
    timesteps = [int(t) for t in timesteps]
    call: dict[str, Any] = {**_steps_kwargs(scheduler_config, timesteps, exact, len(timesteps)),
                            "guidance_scale": float(guidance_scale), "height": int(height), "width": int(width)}
    if kind == "sdxl" and micro_size is not None and tuple(micro_size) != (height, width):
        call["original_size"] = tuple(int(v) for v in micro_size)
        call["target_size"] = tuple(int(v) for v in micro_size)
    steps = {str(k): _steps_kwargs(scheduler_config, timesteps, exact, k) for k in range(1, len(timesteps) + 1)}
    return {
        "format": fmt, "pipeline_class": PIPELINE_CLASSES[kind], "kind": kind, "method": method,
        "teacher": os.fspath(teacher), "lora": bool(lora), "timesteps": timesteps,
        "guidance_scale": float(guidance_scale), "scheduler": "LCMScheduler", "scheduler_config": scheduler_config,
        "call_kwargs": call, "call": ", ".join(f"{k}={v!r}" for k, v in call.items()),
        "steps_accepted": steps, "latent_shape": [int(v) for v in latent_shape], "latents_scale": latents_scale,
        "seeds": "image i of `distill sample --seed S` uses torch.Generator().manual_seed(S + i)",
    }


# ------------------------------------------------------------------------------------------ code sample
def _load_lines(card: dict, folder: str) -> tuple[list[str], list[str]]:
    """(imports, lines that build ``pipe``) for the card's format."""
    cls, teacher = card["pipeline_class"], card["teacher"]
    if card["format"] == "pipeline":
        return [cls], [f"pipe = {cls}.from_pretrained({folder!r})"]
    if card["format"] == "unet":
        return ["LCMScheduler", cls, "UNet2DConditionModel"], [
            f"unet = UNet2DConditionModel.from_pretrained({folder!r}, subfolder='unet')",
            f"scheduler = LCMScheduler.from_pretrained({folder!r}, subfolder='scheduler')",
            f"pipe = {cls}.from_pretrained({teacher!r}, unet=unet, scheduler=scheduler)"]
    return ["LCMScheduler", cls], [
        f"pipe = {cls}.from_pretrained({teacher!r})",
        f"pipe.load_lora_weights({folder!r})",
        f"pipe.scheduler = LCMScheduler.from_pretrained({folder!r}, subfolder='scheduler')"]


def card_code(card: dict, folder: str, prompt: str = "a photo of a cat", seed: int = 0) -> str:
    """The Python code sample of the card: the exact call that reproduces ``distill sample`` image 0 at ``seed``.

    A class-conditional ``UNet2DModel`` student (kind ``unet2d``) has no diffusers pipeline call that takes class
    labels (``DDPMPipeline`` is unconditional): its card loads the parts and points to ``distill sample --label``.
    """
    if card["kind"] == "unet2d":
        return (f"from diffusers import {card['pipeline_class']}\n\n"
                f"pipe = {card['pipeline_class']}.from_pretrained({os.path.abspath(folder)!r})  # unet + LCMScheduler\n"
                f"# class-conditional: DDPMPipeline passes no class labels; sample with\n"
                f"#   distill sample RUN --label L --steps K   (the run folder this was exported from)\n")
    imports, load = _load_lines(card, os.path.abspath(folder))
    kwargs = ", ".join(f"{k}={v!r}" for k, v in card["call_kwargs"].items())
    lines = ["import torch", f"from diffusers import {', '.join(sorted(imports))}", "", *load,
             f"generator = torch.Generator().manual_seed({seed})"]
    if card.get("latents_scale") is not None:
        shape = (1, *card["latent_shape"])
        lines.append(f"latents = torch.randn({shape!r}, generator=generator) * {card['latents_scale']!r}")
        kwargs += ", latents=latents"
    lines.append(f"image = pipe({prompt!r}, {kwargs}, generator=generator).images[0]")
    lines.append("image.save('sample.png')")
    return "\n".join(lines) + "\n"


def card_readme(card: dict, folder: str) -> str:
    """``README.md``: Hugging Face front matter, what the student is, the call, and the steps it accepts."""
    n = len(card["timesteps"])
    steps = "\n".join(f"| {k} | `{', '.join(f'{a}={b!r}' for a, b in v.items())}` |"
                      for k, v in card["steps_accepted"].items())
    usage = {"pipeline": "a complete diffusers pipeline folder (the student's UNet, the teacher's other parts)",
             "unet": "the student's UNet and its scheduler; the other parts come from the teacher",
             "lora": "LoRA weights for the teacher's UNet (`load_lora_weights`) and the student's scheduler"}
    guidance = card["call_kwargs"]["guidance_scale"]
    scaling = card["scheduler_config"]["timestep_scaling"]
    scaling_note = ("switches LCMScheduler's boundary blend off: the student outputs its x0 prediction"
                    if scaling == NO_BOUNDARY_TIMESTEP_SCALING else
                    "the consistency student's boundary scalings c_skip, c_out")
    extra = ""
    if card.get("latents_scale") is not None:
        extra = (f"\n- The student was trained on `sigma(t*) z` (noise_scale: sigma): `latents=` carries the factor "
                 f"{card['latents_scale']!r}; without it the pipeline would feed unit noise.")
    return f"""---
library_name: diffusers
base_model: {card['teacher']}
tags: [distillation, {card['method']}, text-to-image]
---
# Distilled {card['method'].upper()} student ({n}-step)

This folder holds {usage[card['format']]}, exported by `distill export`.

```python
{card_code(card, folder).rstrip()}
```

- Scheduler: `LCMScheduler` at the student's timesteps {card['timesteps']}, with
  `timestep_scaling={scaling!r}` ({scaling_note}).
- `guidance_scale={guidance!r}` is part of the call: do not drop it (the pipeline default would apply
  classifier-free guidance to the student).
- Image `i` of `distill sample --seed S` is this call with `torch.Generator().manual_seed(S + i)`.{extra}

Steps the scheduler accepts: 1 to {n}; {n} is what the student was trained for. For K steps pass:

| steps | arguments |
|---|---|
{steps}
"""


def write_card(card: dict, folder: str) -> None:
    """Write ``distill_student.json`` and ``README.md`` into ``folder``."""
    with open(os.path.join(folder, STUDENT_CARD), "w") as f:
        json.dump(card, f, indent=2)
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card_readme(card, folder))


def load_card(folder: str | os.PathLike) -> dict | None:
    """The card of an exported student folder, or None when ``folder`` has none."""
    path = os.path.join(os.fspath(folder), STUDENT_CARD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        card = json.load(f)
    if "call_kwargs" not in card:
        raise ToolkitError(f"{path} was written by an older export without call arguments; export the run again")
    return card


# ------------------------------------------------------------------------------------------ running it
def pipeline_from_card(card: dict, folder: str | os.PathLike, device: str | torch.device = "cpu"):
    """Build the pipeline exactly as the card's code sample does."""
    import diffusers

    folder = os.fspath(folder)
    cls = getattr(diffusers, card["pipeline_class"])
    if card["format"] != "pipeline":
        from distill.models.loading import resolve_pipeline_dir

        resolve_pipeline_dir(card["teacher"])  # a missing teacher is a one-line error, not a traceback
    if card["format"] == "pipeline":
        pipe = cls.from_pretrained(folder)
    elif card["format"] == "unet":
        unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        scheduler = diffusers.LCMScheduler.from_pretrained(folder, subfolder="scheduler")
        pipe = cls.from_pretrained(card["teacher"], unet=unet, scheduler=scheduler)
    else:
        pipe = cls.from_pretrained(card["teacher"])
        pipe.load_lora_weights(folder)
        pipe.scheduler = diffusers.LCMScheduler.from_pretrained(folder, subfolder="scheduler")
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def call_kwargs(card: dict, steps: int | None = None) -> dict:
    """The card's call arguments, for ``steps`` steps (default: the trained number)."""
    kwargs = dict(card["call_kwargs"])
    if steps is not None and steps != len(card["timesteps"]):
        if str(steps) not in card["steps_accepted"]:
            raise ToolkitError(f"--steps must be between 1 and {len(card['timesteps'])} for this student")
        kwargs.pop("num_inference_steps", None)
        kwargs.pop("timesteps", None)
        kwargs.update(card["steps_accepted"][str(steps)])
    return kwargs


def run_card(pipe, card: dict, prompts: Sequence[str], seeds: Sequence[int], steps: int | None = None,
             output_type: str = "pt") -> torch.Tensor:
    """The card's call on a batch: prompt ``i`` with ``torch.Generator().manual_seed(seeds[i])``.

    Returns images ``[B, 3, H, W]`` in [0, 1] (``output_type="pt"``).
    """
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    kwargs = call_kwargs(card, steps)
    if card.get("latents_scale") is not None:
        shape = (1, *card["latent_shape"])
        kwargs["latents"] = torch.cat([torch.randn(shape, generator=g) * card["latents_scale"] for g in generators])
    return pipe(list(prompts), **kwargs, generator=generators, output_type=output_type).images
