"""Prompt sets and real-image sets for text-to-image runs, indexed by item (the data position is a step count).

Prompt sets (``data.prompts``) give the conditioning of items ``indices``:

* :class:`TextPrompts` -- a prompt file (:mod:`distill.prompt_files`), encoded on the fly by the conditioner;
* :class:`EmbeddedPrompts` -- a folder from ``distill encode-prompts``: cached embeddings read lazily from
  memory-mapped shards; the run does not construct the text encoders.

Real sets (``data.real``, DMD2's GAN term and consistency distillation on real data) give latents and their
captions' conditioning:

* :class:`InMemoryLatents` -- a ``.safetensors`` file with a ``latents`` tensor (and a sibling ``.txt`` of captions);
* :class:`ShardedLatents` -- a folder from ``distill encode-latents``; caption embeddings come from the shards
  when they were stored, else the captions are encoded on the fly;
* :class:`ImageFolderLatents` -- a folder of images with same-name ``.txt`` captions, VAE-encoded on the fly
  with the same preprocessing as ``encode-latents`` (:func:`load_image`, :func:`encode_images`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from distill.models.conditioning import Cond
from distill.models.errors import ToolkitError
from distill.shards import ShardedSet, is_sharded_set

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPT_SET = "prompt-embeddings"
LATENT_SET = "latents"


# ------------------------------------------------------------------------------------------ prompts
#: bytes of per-prompt embeddings a :class:`TextPrompts` keeps (on the run's device) so that a prompt is encoded
#: once: every prompt of a small prompt file (~200 SDXL prompts at 77 x 2048 fp32, 32 FLUX prompts at 512 bf16 T5
#: tokens); past it the rest are encoded on every use (large prompt sets: cache them with ``distill encode-prompts``)
PROMPT_CACHE_BYTES = 128 * 1024**2


def uncond_embedding(conditioner) -> dict[str, torch.Tensor]:
    """The unconditional branch's fields (batch 1) as ``distill encode-prompts`` caches them: the conditioner's own
    ``embed_uncond`` (flow conditioners: Sana's negative prompt has no instruction prefix), else ``embed([""])``."""
    embed_uncond = getattr(conditioner, "embed_uncond", None)
    return embed_uncond() if embed_uncond is not None else conditioner.embed([""])


class TextPrompts:
    """Prompts encoded by ``conditioner`` when asked for; each prompt's embedding is kept after its first encoding.

    A conditioner with the cache interface of ``distill encode-prompts`` (``embed`` / ``from_embeddings``: the
    SD1.x, SDXL and flow-transformer conditioners) encodes each prompt once: its per-prompt fields are kept,
    up to :data:`PROMPT_CACHE_BYTES`, and a batch's Cond is built from them as from cached embeddings (the
    text encoders pad every prompt to a fixed length, so a prompt's embedding does not depend on its batch).
    Prompts past the bound, and conditioners without that interface (class labels), are encoded on every use.
    """

    def __init__(self, prompts: Sequence[str], conditioner, cache_bytes: int = PROMPT_CACHE_BYTES):
        self.prompts, self.conditioner = list(prompts), conditioner
        self.cache_bytes = cache_bytes if hasattr(conditioner, "embed") and hasattr(conditioner, "from_embeddings") \
            else 0
        self._kept: dict[int, dict[str, torch.Tensor]] = {}  # prompt index -> its fields, batch 1
        self._kept_bytes, self._full = 0, False
        self._uncond: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.prompts)

    def cond(self, indices: Sequence[int]) -> Cond:
        indices = list(indices)
        missing = [i for i in dict.fromkeys(indices) if i not in self._kept]
        if not self.cache_bytes or (missing and self._full):
            return self.conditioner([self.prompts[i] for i in indices])
        rows = {}
        if missing:
            fields = self.conditioner.embed([self.prompts[i] for i in missing])
            # clone: a row view would keep the whole batch's storage alive
            rows = {i: {k: v[r:r + 1].clone() for k, v in fields.items()} for r, i in enumerate(missing)}
            size = sum(v.numel() * v.element_size() for v in fields.values())
            if self._kept_bytes + size <= self.cache_bytes:
                self._kept.update(rows)
                self._kept_bytes += size
            else:
                self._full = True  # from now on prompts not kept are encoded with their batch, as without a cache
        if self._uncond is None:
            self._uncond = uncond_embedding(self.conditioner)
        kept = [self._kept.get(i) or rows[i] for i in indices]
        return self.conditioner.from_embeddings({k: torch.cat([r[k] for r in kept]) for k in kept[0]}, self._uncond)


def _check_embeddings(manifest: dict, conditioner, where: Path) -> None:
    fields = tuple(getattr(conditioner, "fields", ()))
    stored = tuple(manifest.get("fields", {}))
    if not fields or set(fields) - set(stored):
        raise ToolkitError(f"{where} holds {', '.join(stored) or 'no embeddings'}; this teacher needs "
                           f"{', '.join(fields)} (encode the prompts with this teacher)")
    # flow conditioners: e.g. a set encoded with 512 text tokens would silently change a 256-token run
    settings = conditioner.cache_settings() if hasattr(conditioner, "cache_settings") else {}
    changed = {k: (manifest.get("conditioner", {}).get(k), v) for k, v in settings.items()
               if manifest.get("conditioner", {}).get(k) != v}
    if changed:
        raise ToolkitError(f"{where} was encoded with " + ", ".join(f"{k}={a!r}" for k, (a, _) in changed.items())
                           + "; this run uses " + ", ".join(f"{k}={b!r}" for k, (_, b) in changed.items())
                           + " (encode again with these settings, e.g. --max-sequence-length)")


def _float(x: torch.Tensor) -> torch.Tensor:
    """Stored embeddings to float32; masks (bool / integer) keep their dtype."""
    return x.float() if x.is_floating_point() else x


class EmbeddedPrompts:
    """Cached prompt embeddings from ``distill encode-prompts`` (memory-mapped shards)."""

    def __init__(self, folder: str | Path, conditioner, kind: str | None = None):
        self.set = ShardedSet(folder, PROMPT_SET)
        if kind is not None and self.set.manifest.get("model_kind") not in (None, kind):
            raise ToolkitError(f"{folder} was encoded for a {self.set.manifest['model_kind']} teacher, not {kind}")
        _check_embeddings(self.set.manifest, conditioner, Path(folder))
        self.conditioner = conditioner
        self.uncond = self.set.uncond()

    def __len__(self) -> int:
        return len(self.set)

    def cond(self, indices: Sequence[int]) -> Cond:
        fields = self.set.get(indices, self.conditioner.fields)
        fields = {k: _float(v) for k, v in fields.items()}
        uncond = None if self.uncond is None else {k: _float(v) for k, v in self.uncond.items()}
        return self.conditioner.from_embeddings(fields, uncond)


def prompt_set(path: str | Path, conditioner, column: str | None = None, kind: str | None = None):
    """:class:`EmbeddedPrompts` for an ``encode-prompts`` folder, else :class:`TextPrompts` of a prompt file."""
    from distill.prompt_files import read_prompts

    if is_sharded_set(path):
        return EmbeddedPrompts(path, conditioner, kind)
    return TextPrompts(read_prompts(path, column), conditioner)


# ------------------------------------------------------------------------------------------ images
def image_files(folder: str | Path) -> list[Path]:
    """Images under ``folder`` (recursively), sorted by path."""
    folder = Path(folder)
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def caption_of(image: Path) -> str:
    """The same-name ``.txt`` next to an image."""
    path = image.with_suffix(".txt")
    if not path.is_file():
        raise ToolkitError(f"no caption for {image}: expected {path} (one caption per image, same name)")
    return path.read_text(encoding="utf-8").strip()


def load_image(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """An RGB image ``[3, H, W]`` in [-1, 1]: resized so it covers ``size`` with its aspect ratio kept (bicubic,
    antialiased), then centre-cropped to ``size = (height, width)``."""
    from PIL import Image

    height, width = size
    with Image.open(path) as img:
        img = img.convert("RGB")
        scale = max(height / img.height, width / img.width)
        new = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
        img = img.resize(new, Image.BICUBIC, reducing_gap=None)
        left, top = (img.width - width) // 2, (img.height - height) // 2
        img = img.crop((left, top, left + width, top + height))
        data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(height, width, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """VAE latents of images in [-1, 1]: the posterior mean times ``scaling_factor`` (deterministic).

    VAEs with a ``shift_factor`` (SD3, FLUX, Z-Image) give ``(mean - shift_factor) * scaling_factor``, as their
    img2img pipelines do (``FluxImg2ImgPipeline._encode_vae_image``); Sana's DC-AE is deterministic (``latent``).
    """
    out = vae.encode(images.to(vae.device, vae.dtype))
    latents = out.latent_dist.mean if hasattr(out, "latent_dist") else out.latent
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    return ((latents - shift) * vae.config.scaling_factor).float()


# ------------------------------------------------------------------------------------------ real sets
class InMemoryLatents:
    """``[N, C, h, w]`` latents in memory with their captions (default: the run's prompts by index)."""

    def __init__(self, latents: torch.Tensor, captions: Sequence[str] | None, conditioner, prompts=None):
        self.latents, self.captions, self.conditioner, self.prompts = latents, captions, conditioner, prompts

    def __len__(self) -> int:
        return self.latents.shape[0]

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, Cond]:
        latents = self.latents[list(indices)]
        if self.captions is None:
            return latents, self.prompts.cond([i % len(self.prompts) for i in indices])
        return latents, self.conditioner([self.captions[i % len(self.captions)] for i in indices])


class ShardedLatents:
    """``distill encode-latents`` output: latents and captions (and caption embeddings, when stored)."""

    def __init__(self, folder: str | Path, conditioner):
        self.set = ShardedSet(folder, LATENT_SET)
        self.conditioner = conditioner
        fields = tuple(getattr(conditioner, "fields", ()))
        self.embedded = bool(fields) and set(fields) <= set(self.set.fields)
        self.uncond = self.set.uncond() if self.embedded else None

    def __len__(self) -> int:
        return len(self.set)

    @property
    def needs_text_encoder(self) -> bool:
        return not self.embedded

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, Cond]:
        latents = self.set.get(indices, ["latents"])["latents"].float()
        if self.embedded:
            fields = {k: v.float() for k, v in self.set.get(indices, self.conditioner.fields).items()}
            uncond = None if self.uncond is None else {k: v.float() for k, v in self.uncond.items()}
            return latents, self.conditioner.from_embeddings(fields, uncond)
        return latents, self.conditioner(self.set.captions(indices))


class ImageFolderLatents:
    """Images with same-name ``.txt`` captions, VAE-encoded when asked for (as ``encode-latents`` does)."""

    def __init__(self, folder: str | Path, vae, size: tuple[int, int], conditioner):
        self.files = image_files(folder)
        if not self.files:
            raise ToolkitError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
        self.captions = [caption_of(f) for f in self.files]
        self.vae, self.size, self.conditioner = vae, size, conditioner

    def __len__(self) -> int:
        return len(self.files)

    def get(self, indices: Sequence[int]) -> tuple[torch.Tensor, Cond]:
        images = torch.stack([load_image(self.files[i], self.size) for i in indices])
        return encode_images(self.vae, images).cpu(), self.conditioner([self.captions[i] for i in indices])


def real_set(path: str | Path, conditioner, prompts, vae=None, size: tuple[int, int] | None = None):
    """The real set ``data.real`` names: an encode-latents folder, an image folder, or a ``.safetensors`` file."""
    p = Path(path)
    if is_sharded_set(p):
        return ShardedLatents(p, conditioner)
    if p.is_dir():
        if vae is None or size is None:
            raise ToolkitError(f"{p}: encoding an image folder needs the teacher's VAE")
        return ImageFolderLatents(p, vae, size, conditioner)
    latents, captions = load_latent_file(p)
    return InMemoryLatents(latents, captions, conditioner, prompts)


def load_latent_file(path: str | Path) -> tuple[torch.Tensor, list[str] | None]:
    """``.safetensors`` with a ``latents`` tensor; captions in a sibling ``.txt`` (one per latent), optional."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"real data not found: {p} (a folder from `distill encode-latents`, a folder of images "
                           f"with .txt captions, or a .safetensors file with a 'latents' tensor)")
    tensors = load_file(str(p))
    if "latents" not in tensors:
        raise ToolkitError(f"{p} has no 'latents' tensor (found: {', '.join(tensors)})")
    captions = p.with_suffix(".txt")
    prompts = [line.strip() for line in captions.read_text().splitlines()] if captions.is_file() else None
    return tensors["latents"].float(), prompts
