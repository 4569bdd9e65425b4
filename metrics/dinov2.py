"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model
evaluation metrics"), computed as their dgm-eval computes them.

dgm-eval (layer6ai-labs/dgm-eval, ``models/dinov2.py``, default options) feeds each image through
``Resize((224, 224), BICUBIC)`` on the PIL image (uint8, antialiased, aspect ratio squashed),
``ToTensor`` (/255) and ImageNet ``Normalize``, and takes the model's output: the CLS token after the
final layer norm (``x_norm_clstoken``), 1024-d for ViT-L/14. The same network is transformers'
``Dinov2Model`` (``facebook/dinov2-large``), whose ``pooler_output`` is that CLS token. Here the resize
runs batched on the compute device (``F.interpolate(..., antialias=True)``, PIL's kernel) in PIL's two
passes, each rounded to uint8 as PIL's uint8 resize does; it matches PIL to within one grey level.

Weights are never downloaded: give the folder of ``facebook/dinov2-large`` (``config.json`` and
``model.safetensors``) with ``--dinov2 PATH`` or ``$DISTILL_DINOV2_PATH``, or pre-fill the Hugging Face
cache. The Frechet distance itself is :func:`metrics.stats.frechet_distance`, as for FID.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.metrics._util import first_line
from distill.metrics.inception import file_sha256
from distill.models.errors import ToolkitError

DINOV2_REPO = "facebook/dinov2-large"
DINOV2_ENV = "DISTILL_DINOV2_PATH"
DINOV2_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DINOV2_TRANSFORM = ("dgm-eval: uint8 RGB, bicubic antialiased resize to 224x224 rounded to uint8 (PIL), /255, "
                    "ImageNet mean/std; DINOv2 CLS token after the final layer norm")


def dinov2_candidates(path: str | os.PathLike | None = None) -> list[Path]:
    """Folders looked at, in order: ``path``, ``$DISTILL_DINOV2_PATH``, the Hugging Face cache of ``facebook/dinov2-large``."""
    found = [Path(p).expanduser() for p in (path, os.environ.get(DINOV2_ENV)) if p]
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(DINOV2_REPO, "config.json")
        if isinstance(cached, str):
            found.append(Path(cached).parent)
    except Exception:  # no hub library or no cache: nothing to add
        pass
    return list(dict.fromkeys(found))


def find_dinov2_weights(path: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The (folder, weights file) of the first candidate holding ``config.json`` and weights; else a one-line error."""
    candidates = dinov2_candidates(path)
    for folder in candidates:
        for name in WEIGHT_FILES:
            if (folder / "config.json").is_file() and (folder / name).is_file():
                return folder, folder / name
    looked = ", ".join(str(c) for c in candidates) or "nowhere: no path given"
    raise ToolkitError(
        f"DINOv2 weights (config.json and model.safetensors of {DINOV2_REPO}) not found (looked in: {looked}); "
        f"download https://huggingface.co/{DINOV2_REPO} into a folder and pass --dinov2 FOLDER or set {DINOV2_ENV}"
    )


def dinov2_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 (or 0-255) ``[N, 3, H, W]`` -> normalised float32 ``[N, 3, 224, 224]`` as dgm-eval feeds DINOv2."""
    x = images.to(torch.float32)
    # PIL resizes uint8 in two passes, width then height, rounding and clipping to uint8 after each:
    # done the same way here (one pass alone differs from PIL by up to 8 grey levels where it overshoots)
    for size in ((x.shape[-2], DINOV2_SIZE), (DINOV2_SIZE, DINOV2_SIZE)):
        if x.shape[-2:] != size:
            x = F.interpolate(x, size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 255).round_()
    x = x / 255  # ToTensor
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Dinov2Features(nn.Module):
    """A ``Dinov2Model`` as a feature extractor: uint8 images ``[N, 3, H, W]`` in, CLS features ``[N, D]`` out.

    ``raw_input = True`` tells :mod:`metrics.fid` to pass the uint8 images as they are (no Inception
    resize); the manifest of statistics made with it records :data:`DINOV2_TRANSFORM`.
    """

    raw_input = True
    transform = DINOV2_TRANSFORM

    def __init__(self, model: nn.Module, weights_hash: str | None = None, name: str = "dinov2"):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.feature_dim = int(model.config.hidden_size)
        self.name = name
        if weights_hash is not None:
            self.weights_hash = weights_hash

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=dinov2_input(images)).pooler_output.float()


def load_dinov2(path: str | os.PathLike | None = None, device: torch.device | str = "cpu") -> Dinov2Features:
    """Load ``Dinov2Model`` from a local folder (see :func:`dinov2_candidates`); never downloads."""
    from transformers import Dinov2Model

    folder, weights = find_dinov2_weights(path)
    try:
        model = Dinov2Model.from_pretrained(str(folder), local_files_only=True, torch_dtype=torch.float32)
    except Exception as err:
        raise ToolkitError(f"cannot load DINOv2 from {folder} ({first_line(err)}); expected the files of "
                           f"https://huggingface.co/{DINOV2_REPO}") from None
    return Dinov2Features(model, weights_hash=file_sha256(weights), name=f"dinov2 {folder.name}").to(device).eval()



def build_tiny_dinov2(folder: str | os.PathLike, seed: int = 0, hidden_size: int = 32) -> Path:
    """Save a random-weight ``Dinov2Model`` (2 layers, patch 14, 224 px) as a stand-in for offline tests."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=2 * hidden_size, image_size=DINOV2_SIZE, patch_size=14)
    Dinov2Model(config).eval().save_pretrained(str(folder), safe_serialization=True)
    return Path(folder)
