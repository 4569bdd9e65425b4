"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ``SD3Transformer2DModel``; Esser et al. 2024).

* Call: ``transformer(hidden_states=x [B, C, H, W], timestep=t * 1000, encoder_hidden_states [B, 77 + L, D],
  pooled_projections [B, P])``; the transformer patchifies (2x2) itself and returns the velocity ``eps - x0``.
* Conditioning: the pipeline's ``encode_prompt``: two CLIP encoders (penultimate hidden states concatenated
  and zero-padded to the T5 width, pooled outputs concatenated) and T5 (zeros when the pipeline has none).
  The unconditional branch is the pipeline's negative prompt (``""``): CFG runs as one batched forward of
  ``[negative; positive]``, as the pipeline does.
* Latents: ``C = transformer.in_channels`` (16 for SD3), ``H = W = resolution / vae_scale_factor``; the VAE
  maps ``latents = (z - shift_factor) * scaling_factor`` (SD3: 0.0609, 1.5305).
* Time: static shift from the scheduler config (SD3.5: 3.0).
"""
from __future__ import annotations

from distill.models.backbones.common import FlowConditioner, FlowTransformer

PIPELINE_CLASS = "StableDiffusion3Pipeline"
PIPELINE_CLASS_NAMES = ("StableDiffusion3Pipeline",)


class Backbone(FlowTransformer):
    """``SD3Transformer2DModel`` behind the toolkit's ``(x, timestep, **cond)`` call."""

    patch_size = 2

    def __init__(self, transformer, gan_blocks=None):
        self.patch_size = int(transformer.config.patch_size)
        super().__init__(transformer, gan_blocks)

    def call_transformer(self, x, timestep, encoder_hidden_states=None, pooled_projections=None):
        return self.transformer(hidden_states=x, timestep=timestep, encoder_hidden_states=encoder_hidden_states,
                                pooled_projections=pooled_projections, return_dict=False)[0]


class Conditioner(FlowConditioner):
    """Prompts -> :class:`Cond` through ``StableDiffusion3Pipeline.encode_prompt`` (negative prompt for CFG)."""

    fields = ("encoder_hidden_states", "pooled_projections")

    def __init__(self, pipe, max_sequence_length: int = 256, negative_prompt: str = ""):
        self.pipe, self.max_sequence_length, self.negative_prompt = pipe, int(max_sequence_length), negative_prompt

    def _branches(self, prompts: list[str], cfg: bool) -> tuple[dict, dict | None]:
        emb, neg, pooled, neg_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.pipe._execution_device,
            do_classifier_free_guidance=cfg, negative_prompt=[self.negative_prompt] * len(prompts),
            max_sequence_length=self.max_sequence_length)
        uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled} if cfg else None
        return {"encoder_hidden_states": emb, "pooled_projections": pooled}, uncond


def card_call_kwargs(conditioner) -> dict:
    """The student is unguided: ``guidance_scale = 1`` turns the pipeline's CFG off."""
    return {"guidance_scale": 1.0, "max_sequence_length": conditioner.max_sequence_length}
