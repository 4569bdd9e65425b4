"""CLIP score (Hessel et al. 2021, "CLIPScore") of images against their captions, with OpenCLIP.

Two conventions, name the one you report:

- ``"cosine"``: mean cosine similarity of the normalised image and text embeddings, as DMD2 and
  GigaGAN report for COCO (OpenCLIP ``ViT-g-14`` / ``laion2b_s12b_b42k``, captions prefixed
  ``"A photo depicts "``; DMD2 SDXL 4-step: 0.332);
- ``"torchmetrics"``: mean of ``max(100 * cos, 0)``, as ``torchmetrics.multimodal.CLIPScore``
  (Hessel et al.'s ``w = 100`` without their 2.5 rescaling).

Images are matched to captions in order: a folder's images sorted by path (name them ``00000.png``,
``00001.png``, ...), one caption per line of the prompts file. Offline, give ``pretrained`` a local
weights file (``open_clip_pytorch_model.bin`` from the model's Hugging Face repo), use
``model="local-dir:/folder"`` (``open_clip_config.json`` plus weights), or pre-fill the Hugging Face
cache and set ``HF_HUB_OFFLINE=1``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from distill.metrics._util import check_int, first_line, resolve_device
from distill.metrics.finite import require_finite
from distill.metrics.sources import FolderSource, TensorSource, ValueRange, check_image_files, to_uint8
from distill.models.errors import ToolkitError

DEFAULT_MODEL = "ViT-g-14"
DEFAULT_PRETRAINED = "laion2b_s12b_b42k"
DMD2_PREFIX = "A photo depicts "
CONVENTIONS = ("cosine", "torchmetrics")
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


@dataclass
class ClipModel:
    """An OpenCLIP model with its evaluation transform (PIL -> tensor) and tokenizer (list[str] -> ids)."""

    model: nn.Module
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str = "custom"


def resolve_model(model: str, pretrained: str | None, quick_gelu: bool | None = None) -> tuple[str, bool]:
    """Check a model name and weights choice without loading anything; returns (model name, force QuickGELU).

    OpenAI's CLIP weights were trained with QuickGELU while OpenCLIP's plain ``ViT-B-32`` / ``ViT-L-14``
    configs use GELU; loading them together silently gives wrong embeddings. Such pairs are switched
    to the ``-quickgelu`` model name, with a warning.
    """
    import open_clip

    if model.startswith("local-dir:"):
        folder = Path(model[len("local-dir:") :])
        if not (folder / "open_clip_config.json").is_file():
            raise ToolkitError(f"{model}: expected a folder holding open_clip_config.json and the weights")
        return model, bool(quick_gelu)
    if model.startswith("hf-hub:"):
        return model, bool(quick_gelu)
    if model not in open_clip.list_models():
        raise ToolkitError(f"unknown OpenCLIP model {model!r} (see open_clip.list_models())")
    if not pretrained:
        return model, bool(quick_gelu)
    if _looks_like_path(pretrained):
        if not Path(pretrained).expanduser().is_file():
            raise ToolkitError(f"CLIP weights file not found: {pretrained}")
        return model, bool(quick_gelu)
    tags = open_clip.list_pretrained_tags_by_model(model)
    if pretrained not in tags:
        raise ToolkitError(f"unknown pretrained tag {pretrained!r} for {model}; known: {', '.join(tags) or 'none'}")
    tag_wants_quick_gelu = open_clip.get_pretrained_cfg(model, pretrained).get("quick_gelu", False)
    has_quick_gelu = (open_clip.get_model_config(model) or {}).get("quick_gelu", False)
    if tag_wants_quick_gelu and not has_quick_gelu and quick_gelu is not False:
        if f"{model}-quickgelu" in open_clip.list_models():
            warnings.warn(f"{pretrained!r} weights use QuickGELU: loading {model}-quickgelu instead of {model}", UserWarning, stacklevel=3)
            return f"{model}-quickgelu", False
        return model, True
    return model, bool(quick_gelu)


def load_clip(
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    *,
    device: torch.device | str | None = None,
    quick_gelu: bool | None = None,
) -> ClipModel:
    """Build an OpenCLIP model, its eval transform and tokenizer; one-line :class:`ToolkitError` offline."""
    import open_clip

    name, force_quick_gelu = resolve_model(model, pretrained, quick_gelu)
    device = resolve_device(device)
    schema_model = name.startswith(("local-dir:", "hf-hub:"))
    try:
        with _quiet_logging():
            clip, _, preprocess = open_clip.create_model_and_transforms(
                name,
                pretrained=None if schema_model else (os.path.expanduser(pretrained) if pretrained else None),
                device=device,
                force_quick_gelu=force_quick_gelu,
            )
            tokenizer = open_clip.get_tokenizer(name)
    except Exception as err:
        cause = first_line(err)
        if "download" not in cause.lower():
            raise ToolkitError(f"cannot load CLIP {name} / {pretrained}: {cause}") from None
        raise ToolkitError(
            f"CLIP weights {name} / {pretrained} are not available offline; download {_weights_source(name, pretrained)} "
            "and pass its path as pretrained (--pretrained PATH), or pre-fill the Hugging Face cache and set HF_HUB_OFFLINE=1"
        ) from None
    return ClipModel(model=clip.eval(), preprocess=preprocess, tokenizer=tokenizer, name=f"{name}/{pretrained}")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """One caption per line (UTF-8); trailing blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise ToolkitError(f"prompts file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise ToolkitError(f"{path} holds no captions")
    return lines


@torch.no_grad()
def clip_score(
    images,
    prompts: Sequence[str] | str | os.PathLike,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str | None = DEFAULT_PRETRAINED,
    clip_model: ClipModel | None = None,
    convention: str = "cosine",
    prefix: str = "",
    value_range: ValueRange | None = None,
    quick_gelu: bool | None = None,
    batch_size: int = 32,
    num_workers: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    return_scores: bool = False,
) -> float | tuple[float, torch.Tensor]:
    """CLIP score of images against captions (see the module docstring for conventions and order).

    Args:
        images: a folder, a list of PIL images or files, or a tensor/array ``[N, 3, H, W]`` (uint8, or
            float with ``value_range``).
        prompts: captions, or a text file with one caption per line.
        model, pretrained: OpenCLIP model name and weights tag or local file (default DMD2's
            ``ViT-g-14`` / ``laion2b_s12b_b42k``); ignored when ``clip_model`` is given.
        clip_model: an already built :class:`ClipModel` (reused across calls, or a test model).
        convention: ``"cosine"`` (DMD2) or ``"torchmetrics"`` (``max(100 cos, 0)``).
        prefix: prepended to every caption; DMD2 uses :data:`DMD2_PREFIX`.
        return_scores: also return the per-image scores (float64, in the chosen convention).
    """
    if convention not in CONVENTIONS:
        raise ToolkitError(f"unknown CLIP score convention {convention!r}; choose {' or '.join(CONVENTIONS)}")
    check_int(batch_size, "batch_size", 1)
    check_int(num_workers, "num_workers", 0)
    items = _open_images(images, value_range)
    captions = read_prompts(prompts) if isinstance(prompts, (str, os.PathLike)) else list(prompts)
    if len(captions) != len(items):
        raise ToolkitError(f"{len(items)} images but {len(captions)} captions; they are matched one to one in sorted order")
    if clip_model is None:
        clip_model = load_clip(model, pretrained, device=device, quick_gelu=quick_gelu)
    device = resolve_device(device) if device is not None else _module_device(clip_model.model)
    clip_model.model.to(device)

    loader = torch.utils.data.DataLoader(_ClipImages(items, clip_model.preprocess), batch_size=batch_size, num_workers=num_workers)
    scores = []
    with tqdm(total=len(items), desc="CLIP score", unit="img", disable=not progress) as bar:
        for start, pixels in zip(range(0, len(items), batch_size), loader):
            text = clip_model.tokenizer([prefix + c for c in captions[start : start + batch_size]])
            image_features = clip_model.model.encode_image(pixels.to(device)).double()
            text_features = clip_model.model.encode_text(text.to(device)).double()
            require_finite(image_features, "CLIP image embeddings", "the CLIP model gave NaN or inf")
            require_finite(text_features, "CLIP text embeddings", "the CLIP model gave NaN or inf")
            cosine = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1, eps=1e-12)
            scores.append(cosine.cpu())
            bar.update(pixels.shape[0])
    scores = torch.cat(scores)
    if convention == "torchmetrics":
        scores = (100 * scores).clamp(min=0)
    mean = float(scores.mean())
    return (mean, scores) if return_scores else mean


def _open_images(images, value_range: ValueRange | None) -> list | torch.Tensor:
    """Validate images without loading a network: file paths, PIL images, or a uint8 ``[N, 3, H, W]`` tensor."""
    if isinstance(images, (str, os.PathLike)):
        return FolderSource.open(images, min_count=1).files
    if isinstance(images, (torch.Tensor, np.ndarray)):
        source = TensorSource.open(images, value_range, min_count=1)
        return to_uint8(source.images, value_range).cpu()
    items = list(images)
    if not items:
        raise ToolkitError("no images given")
    for item in items:
        if not isinstance(item, (Image.Image, str, os.PathLike)):
            raise ToolkitError(f"cannot read an image from a {type(item).__name__}")
    check_image_files([Path(item) for item in items if not isinstance(item, Image.Image)])
    return items


class _ClipImages(torch.utils.data.Dataset):
    def __init__(self, items, preprocess):
        self.items = items
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        item = self.items[index]
        if isinstance(item, torch.Tensor):
            image = Image.fromarray(item.permute(1, 2, 0).numpy())
        elif isinstance(item, Image.Image):
            image = item.convert("RGB")
        else:
            with Image.open(item) as opened:
                image = opened.convert("RGB")
        return self.preprocess(image)


def _weights_source(model: str, pretrained: str | None) -> str:
    """Where a tag's weights live, for the offline message."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained and not _looks_like_path(pretrained) else {}
    hub = cfg.get("hf_hub", "")
    if hub:
        repo, filename = (hub[:-1], "open_clip_pytorch_model.bin") if hub.endswith("/") else hub.rsplit("/", 1)
        return f"{filename} from https://huggingface.co/{repo}"
    if cfg.get("url"):
        return cfg["url"]
    return "the weights file"


def _looks_like_path(value: str) -> bool:
    return "/" in value or "\\" in value or value.lower().endswith(WEIGHT_SUFFIXES) or Path(value).expanduser().exists()


def _module_device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@contextlib.contextmanager
def _quiet_logging():
    """open_clip logs errors to the root logger before raising; the raised error says it in one line."""
    previous = logging.root.manager.disable
    logging.disable(logging.ERROR)
    try:
        yield
    finally:
        logging.disable(previous)
