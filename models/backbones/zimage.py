"""Z-Image (``ZImagePipeline``, ``ZImageTransformer2DModel``; Tongyi-MAI 2025), added as one adapter file.

* Call: the transformer takes *lists* of per-sample latents ``[C, 1, H, W]`` (a frame axis) and of per-sample
  caption features (variable length), and a reversed time: ``(1000 - t * 1000) / 1000 = 1 - t``. It predicts
  ``x0 - eps`` (the pipeline negates it before the Euler step), so the velocity is ``-output``.
* Conditioning: the pipeline's ``encode_prompt`` (Qwen3 with the tokenizer's chat template; second-to-last
  hidden states, only the unmasked tokens). The variable-length features are zero-padded to
  ``max_sequence_length`` with a boolean mask so that they batch, index and concatenate like any
  :class:`Cond`; the adapter unpads them again. CFG: Z-Image's ``pos + w (pos - neg)`` is the toolkit's
  guidance scale ``w + 1``, one batched forward (``cfg_normalization`` / ``cfg_truncation`` off, the defaults).
* Latents: ``C = in_channels``, ``H = 2 (res // (2 f))``; ``latents = (z - shift_factor) * scaling_factor``.
* Time: the scheduler config's shift (static, or FLUX-style by resolution).
* GAN head: image tokens come first in the unified sequence of the main ``layers``.
"""
from __future__ import annotations

import torch

from distill.models.backbones.common import FlowConditioner, FlowTransformer
from distill.models.errors import ToolkitError

PIPELINE_CLASS = "ZImagePipeline"
PIPELINE_CLASS_NAMES = ("ZImagePipeline",)


class Backbone(FlowTransformer):
    """``ZImageTransformer2DModel`` behind the toolkit's ``(x, timestep = t * 1000, **cond)`` call."""

    patch_size = 2

    def blocks(self):
        return list(self.transformer.layers)

    def _block_hook(self, index, module, inputs, output):
        if self._grid is not None:  # unified sequence [image tokens, caption tokens]: keep the image part
            n = self._grid[0] * self._grid[1]
            output = output[:, :n]
        return super()._block_hook(index, module, inputs, output)

    def call_transformer(self, x, timestep, caption_features=None, caption_mask=None):
        t = (1000.0 - timestep) / 1000.0
        latents = list(x.unsqueeze(2).unbind(0))
        captions = [f[m] for f, m in zip(caption_features, caption_mask.bool())]
        # caption tokens take RoPE frame positions 1..L (L padded to 32) and the image the next one: past the
        # table that is an IndexError on the CPU and a device-side assert on a GPU, so refuse it here
        lens = getattr(self.transformer.config, "axes_lens", None)
        longest = max(len(c) for c in captions)
        padded = -(-longest // 32) * 32
        if lens is not None and padded + 1 >= lens[0]:
            raise ToolkitError(f"a caption of {longest} tokens (padded to {padded}) leaves no RoPE frame position for the "
                               f"image in this transformer (axes_lens[0] = {lens[0]}): set "
                               f"teacher.max_sequence_length below {lens[0] - 32}")
        out = self.transformer(latents, t, captions, return_dict=False)[0]
        return -torch.stack([o.to(x.dtype) for o in out]).squeeze(2)


class Conditioner(FlowConditioner):
    """Prompts -> :class:`Cond` via ``ZImagePipeline.encode_prompt``, padded to ``max_sequence_length``."""

    fields = ("caption_features", "caption_mask")

    def __init__(self, pipe, max_sequence_length: int = 512, negative_prompt: str = ""):
        self.pipe, self.max_sequence_length, self.negative_prompt = pipe, int(max_sequence_length), negative_prompt

    def _padded(self, feats: list[torch.Tensor]) -> dict:
        n = self.max_sequence_length
        out = feats[0].new_zeros(len(feats), n, feats[0].shape[-1])
        mask = torch.zeros(len(feats), n, dtype=torch.bool, device=feats[0].device)
        for i, f in enumerate(feats):
            out[i, :len(f)], mask[i, :len(f)] = f, True
        return {"caption_features": out, "caption_mask": mask}

    def _branches(self, prompts: list[str], cfg: bool) -> tuple[dict, dict | None]:
        pos, neg = self.pipe.encode_prompt(prompts, device=self.pipe._execution_device,
                                           do_classifier_free_guidance=cfg,
                                           negative_prompt=[self.negative_prompt] * len(prompts),
                                           max_sequence_length=self.max_sequence_length)
        return self._padded(pos), self._padded(neg) if cfg else None


def default_resolution(pipe) -> tuple[int, int]:
    return 1024, 1024  # ZImagePipeline.__call__'s default height / width


def latent_chw(pipe, resolution) -> tuple[int, int, int]:
    """Latent ``(C, H, W)`` for ``resolution`` pixels.

    Raises ToolkitError when the token grid is past the transformer's RoPE table (``axes_lens``): on a GPU
    that would otherwise be a device-side assert in an index kernel, far from its cause."""
    f = 2 * int(pipe.vae_scale_factor)
    h, w = 2 * (resolution[0] // f), 2 * (resolution[1] // f)
    lens = getattr(pipe.transformer.config, "axes_lens", None)
    if lens is not None and (h // Backbone.patch_size > lens[1] or w // Backbone.patch_size > lens[2]):
        raise ToolkitError(f"resolution {list(resolution)} gives a {h // Backbone.patch_size}x"
                           f"{w // Backbone.patch_size} token grid, past this transformer's RoPE table "
                           f"(axes_lens {list(lens)}): set teacher.resolution lower")
    return int(pipe.transformer.config.in_channels), h, w


def image_seq_len(chw) -> int:
    return (chw[1] // 2) * (chw[2] // 2)


def card_call_kwargs(conditioner) -> dict:
    """Z-Image's CFG is on for any ``guidance_scale > 0``: 0 turns it off for the unguided student."""
    return {"guidance_scale": 0.0, "max_sequence_length": conditioner.max_sequence_length}
