"""Conditioning: what a backbone receives besides ``(x_t, t)``, for the conditional and the unconditional branch.

A :class:`Cond` holds backbone keyword arguments (batch-first tensors, nested dicts allowed, as in
diffusers' ``added_cond_kwargs``) for the conditional branch and, when classifier-free guidance is
possible, for the unconditional branch. Conditioners turn prompts or labels into a ``Cond``:

* :class:`SDXLConditioner` -- two CLIP text encoders; penultimate hidden states concatenated, pooled
  embedding of the second encoder, ``add_time_ids = (h, w, top, left, h, w)`` (Podell et al. 2023,
  SDXL Sec. 2.2). Unconditional: all-zero prompt and pooled embeddings (DMD2's and the SDXL
  pipeline's ``force_zeros_for_empty_prompt``) or the embedding of ``""``.
* :class:`SD15Conditioner` -- one CLIP text encoder, last hidden state; unconditional ``""``.
* :class:`ClassConditioner` -- ``class_labels``; unconditional is the null label.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """Apply ``fn`` to every tensor in nested dicts / lists; other leaves pass through."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tree_map(fn, v) for v in tree)
    return tree


def tree_cat(first: Any, second: Any) -> Any:
    """Concatenate two trees of the same structure along the batch dimension."""
    if isinstance(first, torch.Tensor):
        return torch.cat([first, second], dim=0)
    if isinstance(first, dict):
        return {k: tree_cat(first[k], second[k]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(tree_cat(a, b) for a, b in zip(first, second))
    return first


@dataclass
class Cond:
    """Backbone keyword arguments for the conditional branch and (optionally) the unconditional one."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    uncond: dict[str, Any] | None = None

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Cond":
        return Cond(tree_map(fn, self.kwargs), None if self.uncond is None else tree_map(fn, self.uncond))

    def to(self, device=None, dtype: torch.dtype | None = None) -> "Cond":
        """Move to ``device``; cast floating tensors to ``dtype`` (labels stay integers)."""
        def move(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device) if device is not None else x
            return x.to(dtype) if dtype is not None and x.is_floating_point() else x
        return self.map(move)

    def __getitem__(self, index) -> "Cond":
        """Select samples (a slice, index tensor or boolean mask) from every tensor."""
        return self.map(lambda x: x[index])

    def repeat(self, n: int) -> "Cond":
        """Tile the batch ``n`` times (``[c0, c1, c0, c1, ...]`` order, as ``torch.cat``)."""
        return self.map(lambda x: torch.cat([x] * n, dim=0))

    def cfg_batch(self) -> dict[str, Any]:
        """Keyword arguments for one batched forward of ``[uncond; cond]``."""
        if self.uncond is None:
            raise ValueError("this conditioning has no unconditional branch; classifier-free guidance needs one")
        return tree_cat(self.uncond, self.kwargs)

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        out = conds[0]
        for other in conds[1:]:
            uncond = None if out.uncond is None else tree_cat(out.uncond, other.uncond)
            out = Cond(tree_cat(out.kwargs, other.kwargs), uncond)
        return out


NO_COND = Cond()


class ClassConditioner:
    """Class labels as ``class_labels``; the unconditional branch uses ``null_label``.

    For analytic mixtures the null label is ``-1`` (the whole mixture); for a diffusers ``UNet2DModel``
    trained with label dropout it is the extra class index ``num_classes``.
    """

    def __init__(self, num_classes: int, null_label: int = -1):
        self.num_classes, self.null_label = num_classes, null_label

    def __call__(self, labels: torch.Tensor | Sequence[int]) -> Cond:
        labels = torch.as_tensor(labels, dtype=torch.long)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}], got {labels.tolist()}")
        return Cond({"class_labels": labels}, {"class_labels": torch.full_like(labels, self.null_label)})


def _tokenize(tokenizer, prompts: Sequence[str], device) -> torch.Tensor:
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids.to(device)


def _require_encoders(*encoders) -> None:
    if any(e is None for e in encoders):
        from distill.models.errors import ToolkitError

        raise ToolkitError("the text encoders were not loaded (this run reads cached embeddings from "
                           "`distill encode-prompts`): these prompts have no cached embedding")


class SD15Conditioner:
    """Stable Diffusion 1.x/2.x text conditioning: last hidden state of one CLIP text encoder."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        _require_encoders(self.text_encoder)
        device = self.text_encoder.device
        return self.text_encoder(_tokenize(self.tokenizer, prompts, device))[0]

    #: what ``embed`` returns per prompt (and ``distill encode-prompts`` caches)
    fields = ("prompt_embeds",)

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-prompt text embeddings ``{"prompt_embeds": [B, 77, d]}`` (everything the UNet needs)."""
        return {"prompt_embeds": self.encode_text(list(prompts))}

    def from_embeddings(self, fields: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None) -> Cond:
        """A Cond from cached embeddings; ``uncond``: the embedding of the negative prompt (batch 1)."""
        cond = fields["prompt_embeds"]
        if uncond is None:
            raise ValueError("SD1.x conditioning needs the embedding of the empty prompt for its unconditional branch")
        uncond_emb = uncond["prompt_embeds"].to(cond.device, cond.dtype).expand(cond.shape[0], -1, -1)
        return Cond({"encoder_hidden_states": cond}, {"encoder_hidden_states": uncond_emb.contiguous()})

    def __call__(self, prompts: Sequence[str], negative_prompt: str = "") -> Cond:
        emb = self.encode_text(list(prompts) + [negative_prompt])
        return self.from_embeddings({"prompt_embeds": emb[:-1]}, {"prompt_embeds": emb[-1:]})


class SDXLConditioner:
    """SDXL conditioning (Podell et al. 2023): two text encoders, pooled text embeds, micro-conditioning ids.

    Args:
        uncond: ``"zeros"`` (DMD2 and the SDXL pipeline's default ``force_zeros_for_empty_prompt``)
            or ``"empty"`` (the embedding of the empty prompt).
        resolution: image size ``(height, width)`` in pixels used for ``add_time_ids``.
    """

    def __init__(self, tokenizer, tokenizer_2, text_encoder, text_encoder_2,
                 resolution: tuple[int, int] = (1024, 1024), uncond: str = "zeros"):
        if uncond not in ("zeros", "empty"):
            raise ValueError(f"uncond must be 'zeros' or 'empty', got {uncond!r}")
        self.tokenizers = (tokenizer, tokenizer_2)
        self.text_encoders = (text_encoder, text_encoder_2)
        self.resolution, self.uncond = tuple(resolution), uncond

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (prompt_embeds [B, 77, d1 + d2], pooled [B, d2]) as the SDXL pipeline computes them."""
        _require_encoders(*self.text_encoders)
        hidden, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            out = encoder(_tokenize(tokenizer, prompts, encoder.device), output_hidden_states=True)
            pooled = out[0]  # the second encoder (with projection) is last: its text_embeds are the pooled output
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def time_ids(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        h, w = self.resolution
        return torch.tensor([[h, w, 0, 0, h, w]], device=device, dtype=dtype).repeat(batch, 1)

    #: what ``embed`` returns per prompt (and ``distill encode-prompts`` caches); add_time_ids come from the resolution
    fields = ("prompt_embeds", "pooled_prompt_embeds")

    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-prompt text embeddings: ``prompt_embeds`` [B, 77, d1 + d2], ``pooled_prompt_embeds`` [B, d2]."""
        emb, pooled = self.encode_text(list(prompts))
        return {"prompt_embeds": emb, "pooled_prompt_embeds": pooled}

    def from_embeddings(self, fields: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None) -> Cond:
        """A Cond from cached embeddings. ``uncond``: the embedding of ``""`` (batch 1), used when
        ``self.uncond == "empty"``; with ``"zeros"`` the unconditional branch is all zeros."""
        emb, pooled = fields["prompt_embeds"], fields["pooled_prompt_embeds"]
        if self.uncond == "empty":
            if uncond is None:
                raise ValueError("uncond='empty' needs the embedding of the empty prompt")
            emb_u = uncond["prompt_embeds"].to(emb.device, emb.dtype).expand(emb.shape[0], -1, -1)
            pooled_u = uncond["pooled_prompt_embeds"].to(pooled.device, pooled.dtype).expand(pooled.shape[0], -1)
        else:
            emb_u, pooled_u = torch.zeros_like(emb), torch.zeros_like(pooled)
        return self._cond(emb, pooled, emb_u, pooled_u)

    def __call__(self, prompts: Sequence[str]) -> Cond:
        prompts = list(prompts)
        if self.uncond == "empty":
            emb, pooled = self.encode_text(prompts + [""])
            emb_u, pooled_u = emb[-1:].expand(len(prompts), -1, -1), pooled[-1:].expand(len(prompts), -1)
            emb, pooled = emb[:-1], pooled[:-1]
        else:
            emb, pooled = self.encode_text(prompts)
            emb_u, pooled_u = torch.zeros_like(emb), torch.zeros_like(pooled)
        return self._cond(emb, pooled, emb_u, pooled_u)

    def _cond(self, emb, pooled, emb_u, pooled_u) -> Cond:
        ids = self.time_ids(emb.shape[0], emb.device, emb.dtype)
        cond = {"encoder_hidden_states": emb, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
        uncond = {"encoder_hidden_states": emb_u.contiguous(),
                  "added_cond_kwargs": {"text_embeds": pooled_u.contiguous(), "time_ids": ids}}
        return Cond(cond, uncond)
