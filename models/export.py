"""Export a distilled student as diffusers folders: a UNet, a whole pipeline, or LoRA weights.

* :func:`export_unet` -- a ``UNet2DConditionModel`` folder (``config.json`` + safetensors). A UNet that
  carries a peft LoRA is written with the adapter fused into its weights (without touching the live model).
* :func:`export_pipeline` -- the teacher's pipeline folder with the student's UNet in place, optionally with
  an ``LCMScheduler`` config, the scheduler that samples a DMD2-style few-step student exactly (predict x0,
  re-noise with fresh noise; METHODS.md Sec. 1). ``DiffusionPipeline.from_pretrained(out_dir)`` loads it.
* :func:`export_lora` -- ``pytorch_lora_weights.safetensors`` from peft's ``get_peft_model_state_dict``,
  written by the pipeline class's ``save_lora_weights`` with the adapter config as metadata, so
  ``pipe.load_lora_weights(out_dir)`` applies it with the right rank and alpha.
* :func:`export_student` -- what ``distill export RUN [--format pipeline|unet|lora]`` writes: a pipeline folder,
  a UNet folder or LoRA weights, each with an ``LCMScheduler`` at the student's timesteps and boundary scalings,
  ``distill_student.json`` and a ``README.md`` whose code is the exact call (``models/cards.py``).

Every function accepts a bare UNet or anything wrapping one (:class:`~models.roles.Student`,
:class:`~models.denoiser.Denoiser`, a DDP or ``torch.compile`` wrapper).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from typing import Any, Sequence

import torch
from torch import nn

from distill.models.errors import ToolkitError

#: the file next to an exported pipeline that says how to sample the student
from distill.models.cards import STUDENT_CARD  # noqa: E402  (one definition, in the card module)


def unwrap_unet(model: Any) -> nn.Module:
    """The backbone inside a Student / Teacher / FakeScore / Denoiser, DDP (``.module``) or compiled model."""
    seen = 0
    while seen < 10:
        seen += 1
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ in (
                "FullyShardedDataParallel", "DataParallel"):
            model = model.module
        elif hasattr(model, "denoiser") and isinstance(getattr(model, "denoiser"), nn.Module):
            model = model.denoiser
        elif hasattr(model, "backbone") and isinstance(getattr(model, "backbone"), nn.Module):
            model = model.backbone
        else:
            break
    return model


def _require_diffusers_model(unet: nn.Module) -> None:
    if not (hasattr(unet, "save_config") and hasattr(unet, "config")):
        raise ToolkitError(f"cannot export a {type(unet).__name__}: export needs a diffusers model "
                           f"(UNet2DConditionModel or similar); toy and analytic models have no diffusers folder")


def merged_state_dict(unet: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The UNet's plain state dict, with every active, unmerged peft LoRA adapter added into its base weights.

    ``W' = W + scale * B @ A`` (peft's ``get_delta_weight``), computed in float32; the model is not modified.
    """
    from peft.tuners.lora import LoraLayer

    state = unet.state_dict()
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if any(p.startswith("lora_") for p in parts):
            continue
        merged[key.replace(".base_layer.", ".")] = value
    with torch.no_grad():
        for name, module in unet.named_modules():
            if not isinstance(module, LoraLayer) or module.merged or module.disable_adapters:
                continue
            key = f"{name}.weight"
            weight = merged[key].float()
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                if module.use_dora.get(adapter, False):
                    raise ToolkitError(f"DoRA adapter {adapter!r} in {name}: fused export supports plain LoRA only")
                weight = weight + module.get_delta_weight(adapter).float()
            merged[key] = weight.to(merged[key].dtype)
    out = {}
    for key, value in merged.items():
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value.contiguous().cpu()
    return out


def export_unet(model: Any, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """Write ``model``'s UNet as a diffusers folder (``config.json``, ``diffusion_pytorch_model.safetensors``).

    A LoRA adapter is fused into the weights (a full UNet, loadable without peft). ``dtype`` casts the
    floating weights (e.g. ``torch.float16`` to halve the size). Returns ``out_dir``.
    """
    from safetensors.torch import save_file

    unet = unwrap_unet(model)
    _require_diffusers_model(unet)
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    state = merged_state_dict(unet, dtype)
    unet.save_config(out_dir)
    # shared tensors (tied weights) would make save_file refuse; UNets have none, but clone to be safe
    save_file({k: v.clone() for k, v in state.items()}, os.path.join(out_dir, "diffusion_pytorch_model.safetensors"),
              metadata={"format": "pt"})
    return out_dir


def _lcm_original_steps(timesteps: Sequence[int], num_train_timesteps: int) -> int | None:
    """An ``original_inference_steps`` for which ``LCMScheduler.set_timesteps(len(timesteps))`` gives ``timesteps``."""
    import numpy as np

    n = len(timesteps)
    for original in range(n, num_train_timesteps + 1):
        k = num_train_timesteps // original
        grid = (np.arange(1, original + 1) * k - 1)[::-1]
        picked = grid[np.floor(np.linspace(0, original, num=n, endpoint=False)).astype(np.int64)]
        if list(picked) == list(timesteps):
            return original
    return None


def lcm_scheduler_config(teacher_scheduler_config: dict, timesteps: Sequence[int] | None = None) -> tuple[dict, bool]:
    """An ``LCMScheduler`` config from the teacher's scheduler config.

    Returns ``(config, exact)``: ``exact`` is True when ``pipe(num_inference_steps=len(timesteps))`` alone
    visits ``timesteps`` (``original_inference_steps`` is set for that); otherwise pass ``timesteps=`` at call time.
    """
    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    base = {k: v for k, v in teacher_scheduler_config.items() if k in accepted}
    scheduler = LCMScheduler.from_config(base)
    exact = timesteps is None
    if timesteps is not None:
        original = _lcm_original_steps([int(t) for t in timesteps], scheduler.config.num_train_timesteps)
        if original is not None:
            scheduler = LCMScheduler.from_config(scheduler.config, original_inference_steps=original)
            exact = True
    return dict(scheduler.config), exact


def export_pipeline(pipeline_dir: str | os.PathLike, unet: Any, out_dir: str | os.PathLike, *,
                    scheduler: str | None = None, timesteps: Sequence[int] | None = None,
                    guidance_scale: float | None = None, dtype: torch.dtype | None = None) -> str:
    """Copy the teacher pipeline (folder or Hub id) to ``out_dir`` with ``unet`` (the student) in place.

    Args:
        scheduler: None keeps the teacher's scheduler; ``"lcm"`` writes an ``LCMScheduler`` config that
            samples a few-step student (x0, then fresh-noise re-noising) at ``timesteps``.
        timesteps: the student's times (DMD2 4-step SDXL: ``[999, 749, 499, 249]``), recorded in
            ``distill_student.json`` with ``guidance_scale`` and, when the LCM scheduler cannot produce
            them from ``num_inference_steps`` alone, the ``timesteps=`` to pass at call time.
        dtype: cast the student's weights (the copied components keep theirs).
    """
    from distill.models.loading import load_scheduler_config, resolve_pipeline_dir

    src = resolve_pipeline_dir(pipeline_dir)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.abspath(src) == out_dir:
        raise ToolkitError(f"export_pipeline would overwrite the teacher pipeline in {src}; choose another out_dir")
    if scheduler not in (None, "lcm"):
        raise ToolkitError(f"unknown scheduler {scheduler!r} for export: use None (keep the teacher's) or 'lcm'")
    if scheduler == "lcm" and timesteps is not None and guidance_scale is None:
        # the card's call would otherwise rely on the pipeline's default CFG (5.0 for SDXL) for a distilled student
        raise ToolkitError("export_pipeline with an LCM scheduler needs guidance_scale (0 for DMD2-type students)")
    unet_module = unwrap_unet(unet)
    _require_diffusers_model(unet_module)
    os.makedirs(out_dir, exist_ok=True)
    for entry in os.listdir(src):
        if entry in ("unet", STUDENT_CARD) or entry.startswith("."):
            continue
        source, target = os.path.join(src, entry), os.path.join(out_dir, entry)
        if os.path.isdir(source):
            shutil.copytree(source, target, dirs_exist_ok=True)  # follows the Hub cache's symlinks
        else:
            shutil.copyfile(source, target)
    shutil.rmtree(os.path.join(out_dir, "unet"), ignore_errors=True)
    export_unet(unet_module, os.path.join(out_dir, "unet"), dtype=dtype)

    card: dict[str, Any] = {"timesteps": None if timesteps is None else [int(t) for t in timesteps],
                            "guidance_scale": guidance_scale, "teacher": os.fspath(pipeline_dir)}
    if scheduler == "lcm":
        import diffusers

        config, exact = lcm_scheduler_config(load_scheduler_config(src), timesteps)
        config = {"_class_name": "LCMScheduler", "_diffusers_version": diffusers.__version__,
                  **{k: v for k, v in config.items() if not k.startswith("_")}}
        shutil.rmtree(os.path.join(out_dir, "scheduler"), ignore_errors=True)
        os.makedirs(os.path.join(out_dir, "scheduler"))
        with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(config, f, indent=2)
        index_path = os.path.join(out_dir, "model_index.json")
        with open(index_path) as f:
            index = json.load(f)
        index["scheduler"] = ["diffusers", "LCMScheduler"]
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
        card["scheduler"] = "LCMScheduler"
        if timesteps is not None:
            call = f"num_inference_steps={len(timesteps)}" if exact else f"timesteps={card['timesteps']}"
            card["call"] = call + ("" if guidance_scale is None else f", guidance_scale={guidance_scale}")
    with open(os.path.join(out_dir, STUDENT_CARD), "w") as f:
        json.dump(card, f, indent=2)
    return out_dir


def _pipeline_class(pipeline: str | None, unet: nn.Module):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if pipeline is None:
        pipeline = "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd15"
    classes = {"sdxl": StableDiffusionXLPipeline, "sd15": StableDiffusionPipeline}
    if pipeline not in classes:
        raise ToolkitError(f"unknown pipeline {pipeline!r} for LoRA export; expected one of {sorted(classes)}")
    return classes[pipeline]


def export_lora(model: Any, out_dir: str | os.PathLike, pipeline: str | None = None, *,
                adapter_name: str = "default", merged: bool = False, dtype: torch.dtype | None = None) -> str:
    """Write the UNet's LoRA adapter so that ``pipe.load_lora_weights(out_dir)`` applies it.

    Args:
        model: a UNet with a peft adapter (from :func:`distill.models.roles.add_lora`) or anything wrapping one.
        pipeline: ``"sdxl"`` / ``"sd15"`` (whose ``save_lora_weights`` writes the file); None: from the UNet config.
        merged: write a full UNet with the adapter fused instead (see :func:`export_unet`).
        dtype: cast the LoRA weights (e.g. ``torch.float16``).
    """
    from peft.utils import get_peft_model_state_dict

    unet = unwrap_unet(model)
    _require_diffusers_model(unet)
    peft_config = getattr(unet, "peft_config", None) or {}
    if adapter_name not in peft_config:
        have = sorted(peft_config) or "none"
        raise ToolkitError(f"the UNet has no LoRA adapter {adapter_name!r} (adapters: {have}); add one with "
                           f"distill.models.roles.add_lora, or export the full UNet with export_unet")
    out_dir = os.fspath(out_dir)
    if merged:
        return export_unet(unet, out_dir, dtype=dtype)
    state = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    # Keys stay in peft's format (``to_q.lora_A.weight``). ``convert_state_dict_to_diffusers`` would rename only
    # the attention keys (``to_q.lora.down``) and leave conv / ff / time-embedding keys as ``lora_A``; diffusers'
    # loader decides the format from the *first* key, so such a mixed file silently loses every attention LoRA.
    state = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in state.items()}
    metadata = peft_config[adapter_name].to_dict()
    _pipeline_class(pipeline, unet).save_lora_weights(out_dir, unet_lora_layers=state, safe_serialization=True,
                                                      unet_lora_adapter_metadata=metadata)
    return out_dir


def _write_lcm_scheduler(out_dir: str, config: dict) -> None:
    """``out_dir/scheduler/scheduler_config.json`` naming ``LCMScheduler`` with ``config``."""
    import diffusers

    folder = os.path.join(out_dir, "scheduler")
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(folder)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "LCMScheduler", "_diffusers_version": diffusers.__version__,
                   **{k: v for k, v in config.items() if not k.startswith("_")}}, f, indent=2)


def export_student(models: Any, config: Any, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                   fmt: str | None = None) -> str:
    """Export a trained student of a run (``distill export``) with a card that reproduces it (``models/cards.py``).

    Formats (``fmt``; default ``lora`` for a LoRA student, else ``pipeline``):

    * ``pipeline`` -- the teacher's pipeline folder with the student's UNet (a LoRA fused in) and an
      ``LCMScheduler`` at the student's timesteps. LCM is used for one-step students too: it predicts x0 at
      ``t*`` (the teacher's own scheduler with one ``leading`` step would start at timestep 1, not at ``t*``), and
      for several steps it re-noises with fresh noise exactly as the student was trained (METHODS.md Sec. 1).
    * ``unet`` -- ``unet/`` (fused) and ``scheduler/``; the other components come from the teacher.
    * ``lora`` -- ``pytorch_lora_weights.safetensors`` for ``load_lora_weights`` on the teacher's pipeline, and
      ``scheduler/`` (LoRA students only).

    Every format gets ``distill_student.json`` and ``README.md`` whose code sample is the exact call,
    ``guidance_scale`` included. The scheduler carries the student's boundary scalings.

    Args:
        models: :class:`distill.build.Models` of a diffusers teacher (``models.pipeline`` set), student loaded.
        config: the run's :class:`distill.config.Config`.
        dtype: cast the exported weights (e.g. ``torch.float16``).
    """
    from distill.models import cards
    from distill.models.loading import load_scheduler_config
    from distill.models.roles import has_lora

    pipeline = getattr(models, "pipeline", None)
    if pipeline is None:
        raise ToolkitError("export needs a diffusers teacher (sdxl / sd15); toy students are sampled with "
                           "`distill sample`")
    student = models.student
    unet = unwrap_unet(student)
    _require_diffusers_model(unet)
    lora = has_lora(unet)
    fmt = fmt or ("lora" if lora else "pipeline")
    if fmt not in cards.FORMATS:
        raise ToolkitError(f"unknown export format {fmt!r}; expected one of {', '.join(cards.FORMATS)}")
    if fmt == "lora" and not lora:
        raise ToolkitError("--format lora needs a LoRA student (student.lora in the recipe); this student is a full "
                           "UNet: use --format pipeline or unet")
    timesteps = [int(t) for t in student.timesteps.tolist()]
    method = config.method["name"]
    scheduler_config, exact = cards.lcm_config_for(load_scheduler_config(pipeline.path), timesteps,
                                                   cards.student_timestep_scaling(student))
    latents_scale = None
    if getattr(student, "noise_scale", "unit") != "unit":
        latents_scale = float(student.input_from_noise(torch.ones(1, dtype=torch.float64)).item())
    latent_shape = tuple(models.sample_shape)
    factor = pipeline.vae_scale_factor
    conditioner_size = getattr(pipeline.conditioner, "resolution", None)
    card = cards.build_card(kind=pipeline.kind, fmt=fmt, method=method, timesteps=timesteps,
                            guidance_scale=cards.student_guidance_scale(method, unet, student),
                            scheduler_config=scheduler_config, exact=exact, height=latent_shape[-2] * factor,
                            width=latent_shape[-1] * factor, latent_shape=latent_shape,
                            teacher=config.teacher.path or pipeline.path, micro_size=conditioner_size,
                            latents_scale=latents_scale, lora=lora)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if fmt == "pipeline":
        export_pipeline(pipeline.path, unet, out_dir, scheduler="lcm", timesteps=timesteps,
                        guidance_scale=card["guidance_scale"], dtype=dtype)
    elif fmt == "unet":
        os.makedirs(out_dir, exist_ok=True)
        shutil.rmtree(os.path.join(out_dir, "unet"), ignore_errors=True)
        export_unet(unet, os.path.join(out_dir, "unet"), dtype=dtype)
    else:
        export_lora(unet, out_dir, pipeline=pipeline.kind, dtype=dtype)
    _write_lcm_scheduler(out_dir, scheduler_config)
    cards.write_card(card, out_dir)
    return out_dir
