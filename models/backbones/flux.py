"""FLUX.1 (``FluxPipeline``, ``FluxTransformer2DModel``; Black Forest Labs 2024).

* Call: latents ``[B, C, H, W]`` are packed into 2x2 patches ``[B, HW/4, 4C]`` (the pipeline's
  ``_pack_latents``) with position ids ``img_ids`` (``_prepare_latent_image_ids``) and all-zero ``txt_ids``;
  ``transformer(hidden_states, timestep=t, guidance, pooled_projections, encoder_hidden_states, txt_ids,
  img_ids)`` -- FLUX takes ``t`` in [0, 1] (the pipeline passes ``timestep / 1000``; the transformer scales by
  1000 itself) -- and the velocity is unpacked back to ``[B, C, H, W]``.
* Guidance: FLUX.1-dev is guidance-distilled: the teacher's guidance is the **guidance embedding**
  (``teacher.guidance_embedding``, default 3.5, the pipeline's default), passed to every network with the
  conditioning, not CFG (leave ``method.guidance_scale: 1``). True CFG over the negative prompt ``""`` is
  still available (``method.guidance_scale > 1``, one batched forward). FLUX.1-schnell has no embedding.
* Conditioning: the pipeline's ``encode_prompt``: CLIP pooled output and T5 hidden states.
* Time: FLUX shifts by resolution (``use_dynamic_shifting``): ``mu`` from the number of image tokens, shift
  ``e^mu`` (models/backbones/common.py, ``flow_schedule``). Latents: ``(z - 0.1159) * 0.3611``.
"""
from __future__ import annotations

import torch

from distill.models.backbones.common import FlowConditioner, FlowTransformer
from distill.models.errors import ToolkitError

PIPELINE_CLASS = "FluxPipeline"
PIPELINE_CLASS_NAMES = ("FluxPipeline",)
DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale default


def pack(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, HW/4, 4C]``, ``FluxPipeline._pack_latents``."""
    from diffusers import FluxPipeline

    b, c, h, w = x.shape
    return FluxPipeline._pack_latents(x, b, c, h, w)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`pack` (``FluxPipeline._unpack_latents`` in latent units)."""
    b, _, dim = tokens.shape
    c = dim // 4
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


class Backbone(FlowTransformer):
    """``FluxTransformer2DModel`` behind the toolkit's ``(x, timestep = t * 1000, **cond)`` call."""

    patch_size = 2  # 2x2 packing: one token per 2x2 latent patch

    def blocks(self):
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)

    def call_transformer(self, x, timestep, encoder_hidden_states=None, pooled_projections=None, guidance=None):
        from diffusers import FluxPipeline

        b, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ToolkitError(f"FLUX latents need an even size, got {h}x{w}")
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
        txt_ids = torch.zeros(encoder_hidden_states.shape[1], 3, device=x.device, dtype=x.dtype)
        if guidance is not None:
            guidance = guidance.to(torch.float32)
        out = self.transformer(hidden_states=pack(x), timestep=timestep / 1000, guidance=guidance,
                               pooled_projections=pooled_projections, encoder_hidden_states=encoder_hidden_states,
                               txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        return unpack(out, h, w)


class Conditioner(FlowConditioner):
    """Prompts -> :class:`Cond` via ``FluxPipeline.encode_prompt``; the guidance embedding rides along."""

    fields = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, pipe, max_sequence_length: int = 512, guidance_embedding: float | None = None,
                 negative_prompt: str = ""):
        self.pipe, self.max_sequence_length, self.negative_prompt = pipe, int(max_sequence_length), negative_prompt
        embeds = bool(pipe.transformer.config.guidance_embeds)
        if guidance_embedding is not None and not embeds:
            raise ToolkitError("teacher.guidance_embedding is set but this FLUX transformer has no guidance "
                               "embedding (FLUX.1-schnell): use method.guidance_scale (CFG) or nothing")
        self.guidance_embedding = (DEFAULT_GUIDANCE if guidance_embedding is None else float(guidance_embedding)) \
            if embeds else None

    def _encode(self, prompts: list[str]) -> dict:
        emb, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.pipe._execution_device,
                                                 max_sequence_length=self.max_sequence_length)
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}

    def _branches(self, prompts: list[str], cfg: bool) -> tuple[dict, dict | None]:
        return self._encode(prompts), self._encode([self.negative_prompt] * len(prompts)) if cfg else None

    def _extras(self, n: int, device) -> dict:
        if self.guidance_embedding is None:
            return {}
        return {"guidance": torch.full((n,), self.guidance_embedding, device=device)}


def default_resolution(pipe) -> tuple[int, int]:
    size = int(pipe.default_sample_size) * int(pipe.vae_scale_factor)
    return size, size


def latent_chw(pipe, resolution) -> tuple[int, int, int]:
    f = 2 * int(pipe.vae_scale_factor)
    if resolution[0] % f or resolution[1] % f:
        raise ToolkitError(f"FLUX images must divide by {f} (VAE factor x 2x2 packing), got {resolution}")
    return int(pipe.transformer.config.in_channels) // 4, 2 * (resolution[0] // f), 2 * (resolution[1] // f)


def image_seq_len(chw) -> int:
    """Image tokens after packing, which set FLUX's resolution-dependent shift."""
    return (chw[1] // 2) * (chw[2] // 2)


def card_call_kwargs(conditioner) -> dict:
    """``guidance_scale`` is FLUX's guidance embedding (the student was trained with it), not CFG."""
    scale = conditioner.guidance_embedding if conditioner.guidance_embedding is not None else 1.0
    return {"guidance_scale": scale, "max_sequence_length": conditioner.max_sequence_length}
