"""What ``distill eval`` generates from: a run folder, an exported pipeline folder, or a cached Hub id.

A generator is a callable ``generate(prompts, seeds) -> uint8 images [B, 3, H, W]``. Image ``i`` of
an evaluation uses prompt ``i mod P`` and seed ``seed + i``, and its initial noise comes from its own
generator, so an image does not depend on which process makes it or on the batch around it (the
multi-step re-noising of a run's student draws from one generator per batch; batches are the same
whatever the number of processes, see :func:`metrics.eval_loop.shard_batches`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import torch

from distill.metrics.sources import to_uint8
from distill.models.errors import ToolkitError

ImageGenerator = Callable[[Sequence[str], Sequence[int]], torch.Tensor]


def check_model(model: str | os.PathLike) -> str:
    """Which kind of model this is (``run``, ``pipeline`` or ``hub``), checked without loading it."""
    path = Path(model)
    if path.is_dir():
        if (path / "config.yaml").is_file():
            if not (path / "checkpoints").is_dir():
                raise ToolkitError(f"{path} is a run folder without checkpoints; train first")
            return "run"
        if (path / "model_index.json").is_file() or (path / "distill_student.json").is_file():
            return "pipeline"
        raise ToolkitError(f"{path} is neither a run folder (config.yaml) nor a pipeline folder (model_index.json)")
    from distill.models.loading import is_repo_id

    if is_repo_id(os.fspath(model)):
        return "hub"
    raise ToolkitError(f"model not found: {model} (pass a run folder, an exported pipeline folder or a Hub id)")


def open_model(model: str | os.PathLike, *, steps: int | None = None, device=None,
               guidance_scale: float | None = None, dtype: str = "float32") -> tuple[ImageGenerator, dict]:
    """A generator for ``model`` and a description of it (kind, path, timesteps, guidance) for metrics.json."""
    kind = check_model(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if kind == "run":
        return _run_generator(Path(model), steps, device)
    return _pipeline_generator(os.fspath(model), steps, device, guidance_scale, getattr(torch, dtype))


def _run_generator(run: Path, steps: int | None, device: torch.device) -> tuple[ImageGenerator, dict]:
    from distill.commands import load_run
    from distill.sample_grids import decode_to_images
    from distill.samplers import sample_student

    config, models = load_run(run)
    if models.pipeline is None or len(models.sample_shape) != 3:
        raise ToolkitError(f"{run} is not a text-to-image run; `distill eval` scores image students with prompts")
    student = models.student.to(device)
    if models.pipeline.vae is not None:
        models.pipeline.vae.to(device)
    timesteps = _steps(student.timesteps.tolist(), steps)

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        z = torch.stack([torch.randn(models.sample_shape, generator=torch.Generator().manual_seed(int(s)))
                         for s in seeds]).to(device)
        renoise = torch.Generator(device).manual_seed(int(seeds[0]))
        cond = models.conditioner(list(prompts)).to(device)  # the text encoders may live elsewhere
        x = sample_student(student, z, cond, timesteps, generator=renoise)
        return to_uint8(decode_to_images(x.float(), models), (0, 1))

    return generate, {"kind": "run", "path": str(run), "timesteps": timesteps, "teacher": config.teacher.path}


def _pipeline_generator(model: str, steps: int | None, device: torch.device, guidance_scale: float | None,
                        dtype: torch.dtype = torch.float32) -> tuple[ImageGenerator, dict]:
    from diffusers import DiffusionPipeline

    from distill.models.loading import resolve_pipeline_dir

    folder = resolve_pipeline_dir(model)
    card_path = Path(folder) / "distill_student.json"
    card = json.loads(card_path.read_text()) if card_path.is_file() else {}
    try:
        if card.get("lora"):
            from diffusers import LCMScheduler

            pipe = DiffusionPipeline.from_pretrained(card["teacher"], torch_dtype=dtype)
            pipe.load_lora_weights(folder)
            pipe.scheduler = LCMScheduler.from_config(card["scheduler_config"])
        else:
            pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    except Exception as err:
        raise ToolkitError(f"cannot load the pipeline in {folder}: {str(err).splitlines()[0]}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    timesteps = _steps(card["timesteps"], steps) if card.get("timesteps") else None
    if timesteps is None and steps is None:
        raise ToolkitError(f"{folder} has no distill_student.json with the student's timesteps: pass --steps")
    # a DMD2-style student has the guidance baked in: no classifier-free guidance unless the card says so
    scale = guidance_scale if guidance_scale is not None else (card.get("guidance_scale") or 1.0)

    def generate(prompts: Sequence[str], seeds: Sequence[int]) -> torch.Tensor:
        generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        kwargs = {"timesteps": timesteps} if timesteps is not None else {"num_inference_steps": steps}
        with torch.no_grad():
            images = pipe(prompt=list(prompts), guidance_scale=scale, generator=generators, output_type="pt",
                          **kwargs).images
        return to_uint8(torch.as_tensor(images).float(), (0, 1), what="generated images")

    return generate, {"kind": "pipeline", "path": folder, "timesteps": timesteps, "guidance_scale": scale,
                      "scheduler": type(pipe.scheduler).__name__, "dtype": str(dtype).replace("torch.", "")}


def _steps(timesteps: list, steps: int | None) -> list[int]:
    """K of the student's timesteps, evenly spaced by index as ``LCMScheduler`` (and ``distill sample``) picks them."""
    from distill.models.cards import subset_timesteps

    return subset_timesteps(timesteps, steps)
