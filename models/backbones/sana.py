"""Sana (``SanaPipeline``, ``SanaTransformer2DModel``; Xie et al. 2024, arXiv:2410.10629).

* Call: ``transformer(hidden_states=x, encoder_hidden_states, encoder_attention_mask, timestep = t * 1000 *
  timestep_scale)``; linear attention over patch-1 tokens of the 32x-compressing DC-AE latents; a learned-sigma
  head (``out_channels = 2C``) is cut to its first half, as the pipeline does.
* Conditioning: the pipeline's ``encode_prompt`` with Gemma-2 (the last hidden state, the attention mask, and
  the pipeline's default ``complex_human_instruction`` prefix, so training sees what ``pipe(prompt)`` sees).
  The unconditional branch is the negative prompt ``""``: CFG runs as one batched forward.
* Latents: ``C = transformer.in_channels`` (32), ``H = resolution / 32``; ``latents = z * scaling_factor``.
* Time: static shift (``shift``, or ``flow_shift`` in a DPM-Solver config; Sana uses 3.0).
"""
from __future__ import annotations

import inspect

from distill.models.backbones.common import FlowConditioner, FlowTransformer

PIPELINE_CLASS = "SanaPipeline"
PIPELINE_CLASS_NAMES = ("SanaPipeline",)


class Backbone(FlowTransformer):
    """``SanaTransformer2DModel`` behind the toolkit's ``(x, timestep = t * 1000, **cond)`` call."""

    def __init__(self, transformer, gan_blocks=None):
        self.patch_size = int(transformer.config.patch_size)
        super().__init__(transformer, gan_blocks)

    def call_transformer(self, x, timestep, encoder_hidden_states=None, encoder_attention_mask=None):
        scale = float(getattr(self.transformer.config, "timestep_scale", 1.0) or 1.0)
        out = self.transformer(hidden_states=x, encoder_hidden_states=encoder_hidden_states,
                               encoder_attention_mask=encoder_attention_mask, timestep=timestep * scale,
                               return_dict=False)[0]
        if out.shape[1] == 2 * x.shape[1]:  # learned sigma: the pipeline keeps the first half
            out = out.chunk(2, dim=1)[0]
        return out


def _call_default(pipe, name: str):
    return inspect.signature(type(pipe).__call__).parameters[name].default


class Conditioner(FlowConditioner):
    """Prompts -> :class:`Cond` via ``SanaPipeline.encode_prompt`` with the pipeline's own call defaults."""

    fields = ("encoder_hidden_states", "encoder_attention_mask")

    def __init__(self, pipe, max_sequence_length: int | None = None, negative_prompt: str = ""):
        self.pipe, self.negative_prompt = pipe, negative_prompt
        self.max_sequence_length = int(max_sequence_length or _call_default(pipe, "max_sequence_length"))
        self.complex_human_instruction = _call_default(pipe, "complex_human_instruction")

    def _branches(self, prompts: list[str], cfg: bool) -> tuple[dict, dict | None]:
        # the negative prompt has no instruction prefix and is padded to the prompts' (fixed) length
        emb, mask, neg, neg_mask = self.pipe.encode_prompt(
            prompts, do_classifier_free_guidance=cfg, negative_prompt=self.negative_prompt,
            device=self.pipe._execution_device, clean_caption=False, max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.complex_human_instruction)
        uncond = {"encoder_hidden_states": neg, "encoder_attention_mask": neg_mask} if cfg else None
        return {"encoder_hidden_states": emb, "encoder_attention_mask": mask}, uncond


def card_call_kwargs(conditioner) -> dict:
    return {"guidance_scale": 1.0, "max_sequence_length": conditioner.max_sequence_length, "clean_caption": False,
            "use_resolution_binning": False}
