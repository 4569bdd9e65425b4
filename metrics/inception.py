"""The clean-fid Inception pipeline: the ``clean`` resize and the TorchScript InceptionV3 weights.

clean-fid (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN Evaluation")
mode ``clean`` resizes every uint8 image to 299x299 per channel with PIL's bicubic filter on float
values, clips to [0, 255] and does not re-quantise; then the TorchScript port of the TF InceptionV3
(``inception-2015-12-05.pt``, pool3, 2048-d) sees ``(x - 128) / 128``. Here the resize is
``F.interpolate(..., antialias=True)`` in float64 on the compute device, which uses PIL's kernel
(bicubic a=-0.5, widened when downsampling) and matches clean-fid's resizer to ~2e-5 on the 0-255 scale.

clean-fid downloads the weights into ``/tmp`` (``./`` on Windows) with no way to configure it; here
the file comes from an explicit path, ``$DISTILL_INCEPTION_PATH`` or clean-fid's location, and is
never downloaded.
"""
from __future__ import annotations

import hashlib
import os
import platform
import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.metrics._util import first_line
from distill.models.errors import ToolkitError

INCEPTION_FILENAME = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "DISTILL_INCEPTION_PATH"
INCEPTION_DIM = 2048
INCEPTION_SIZE = 299
CLEAN_TRANSFORM = "clean-fid clean: uint8 RGB, bicubic antialiased resize to 299x299 in float64, clip [0,255], no re-quantisation"


def clean_resize(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Resize a batch ``[N, 3, H, W]`` of 0-255 values to ``[N, 3, size, size]`` float64, clean-fid style.

    The aspect ratio is squashed, as clean-fid does. Already-``size`` inputs pass through (the
    antialiased bicubic kernel at scale 1 is the identity).
    """
    x = images.to(torch.float64)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, (size, size), mode="bicubic", align_corners=False, antialias=True)
    return x.clamp_(0, 255)


CPU_CHUNK = 4  # images resized at once on a CPU: the float64 working set then stays in cache


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """What the feature extractor sees: :func:`clean_resize` in float64, then float32 (as clean-fid feeds it).

    On a CPU the batch is resized a few images at a time, about twice as fast as one large batch
    (whose float64 intermediates do not fit in cache); values are identical either way.
    """
    if images.device.type != "cpu":
        return clean_resize(images).to(torch.float32)
    out = torch.empty((images.shape[0], images.shape[1], INCEPTION_SIZE, INCEPTION_SIZE), dtype=torch.float32)
    for start in range(0, images.shape[0], CPU_CHUNK):
        out[start : start + CPU_CHUNK] = clean_resize(images[start : start + CPU_CHUNK])
    return out


def cleanfid_cache_dirs() -> list[Path]:
    """Folders where clean-fid 0.1.35 keeps the downloaded weights (``features.feature_extractor``)."""
    dirs = [Path("." if platform.system() == "Windows" else "/tmp"), Path(tempfile.gettempdir())]
    return list(dict.fromkeys(dirs))


def inception_candidates(path: str | Path | None = None) -> list[Path]:
    """Places looked at, in order: ``path``, ``$DISTILL_INCEPTION_PATH``, clean-fid's download folder.

    A folder stands for ``<folder>/inception-2015-12-05.pt``.
    """
    found = []
    for given in (path, os.environ.get(INCEPTION_ENV)):
        if given:
            given = Path(given).expanduser()
            found.append(given / INCEPTION_FILENAME if given.is_dir() else given)
    found += [folder / INCEPTION_FILENAME for folder in cleanfid_cache_dirs()]
    return list(dict.fromkeys(found))


def find_inception_weights(path: str | Path | None = None) -> Path:
    candidates = inception_candidates(path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise ToolkitError(
        f"Inception weights {INCEPTION_FILENAME} not found (looked in: {looked}); download {INCEPTION_URL} "
        f"and pass --inception PATH or set {INCEPTION_ENV}"
    )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class InceptionFeatures(nn.Module):
    """pool3 features (2048-d) of the TorchScript InceptionV3, for 0-255 inputs already at 299x299.

    Same normalisation and layers as clean-fid's ``InceptionV3W`` with ``resize_inside=False``.
    """

    feature_dim = INCEPTION_DIM

    def __init__(self, scripted: torch.jit.ScriptModule, weights_hash: str = "", name: str = INCEPTION_FILENAME):
        super().__init__()
        self.layers = scripted.layers
        self.weights_hash = weights_hash
        self.name = name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - 128) / 128).reshape(x.shape[0], -1)


def load_inception(path: str | Path | None = None, device: torch.device | str = "cpu") -> InceptionFeatures:
    """Load the clean-fid TorchScript InceptionV3 from a local file (see :func:`inception_candidates`)."""
    weights = find_inception_weights(path)
    try:
        with warnings.catch_warnings():  # the TorchScript file is the protocol; its deprecation notice is noise
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(str(weights), map_location="cpu").eval()
        scripted.layers  # noqa: B018 - the feature trunk clean-fid uses must exist
    except Exception as err:
        raise ToolkitError(
            f"cannot load Inception weights from {weights} ({first_line(err)}); expected the file from {INCEPTION_URL}"
        ) from None
    return InceptionFeatures(scripted, weights_hash=file_sha256(weights), name=weights.name).to(device).eval()
