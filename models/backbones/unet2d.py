"""Pixel-space ``UNet2DModel`` teachers (``DDPMPipeline`` folders), e.g. the digits teacher.

A folder with ``model_index.json``, ``unet/`` (a ``UNet2DModel``) and ``scheduler/`` (DDPM-family config)
loads as :class:`~models.loading.PipelineComponents` with no VAE (the generator works on pixels in [-1, 1])
and, for a class-conditional UNet (``num_class_embeds``), a :class:`~models.conditioning.ClassConditioner`
whose unconditional branch is the last class index (the null label the model was trained with under
label dropout). ``distill_digits.json`` beside the pipeline may name ``num_classes`` / ``null_label``.
"""
from __future__ import annotations

import json
import os

import torch

from distill.models.conditioning import ClassConditioner
from distill.models.errors import ToolkitError

PIPELINES = ("DDPMPipeline", "DDIMPipeline")


def is_unet2d_pipeline(index: dict) -> bool:
    """True for ``model_index.json`` of a pixel UNet2DModel pipeline (no VAE, no text encoder)."""
    unet = index.get("unet") or [None, None]
    return str(index.get("_class_name", "")) in PIPELINES or unet[1] == "UNet2DModel"


def class_conditioner(unet, folder: str) -> ClassConditioner | None:
    """Labels 0..K-1 and the null label K for a UNet with ``K + 1`` class embeddings; None if unconditional."""
    embeds = getattr(unet.config, "num_class_embeds", None)
    if not embeds:
        return None
    card = os.path.join(folder, "distill_digits.json")
    meta = json.load(open(card)) if os.path.isfile(card) else {}
    num_classes = int(meta.get("num_classes", embeds - 1))
    null = int(meta.get("null_label", embeds - 1))
    if not 0 <= null < embeds or num_classes > embeds:
        raise ToolkitError(f"{card}: num_classes {num_classes} / null_label {null} do not fit the UNet's "
                           f"{embeds} class embeddings")
    return ClassConditioner(num_classes, null_label=null)


def load_unet2d_components(folder: str, dtype: torch.dtype = torch.float32, device="cpu", variant: str | None = None):
    """:class:`PipelineComponents` of a ``UNet2DModel`` pipeline folder (files checked before loading)."""
    from diffusers import UNet2DModel

    from distill.models.loading import (_DIFFUSERS_WEIGHTS, PipelineComponents, _require_model, denoiser_from_unet,
                                        load_scheduler_config)

    _require_model(folder, "unet", _DIFFUSERS_WEIGHTS, variant)
    scheduler_config = load_scheduler_config(folder)
    unet = UNet2DModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, variant=variant)
    unet.to(device).eval()
    return PipelineComponents(kind="unet2d", path=folder, unet=unet, vae=None, scheduler_config=dict(scheduler_config),
                              denoiser=denoiser_from_unet(unet, scheduler_config),
                              conditioner=class_conditioner(unet, folder))
