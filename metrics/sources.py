"""What the metrics read: image folders, ``.npz`` files, in-memory images and generator callables.

Every source is validated when it is opened, before any network is loaded, so a bad path or an
unreadable file fails in a second with one line. Image sources yield uint8 RGB batches
``[B, 3, H, W]``; floats are quantised first, as clean-fid's protocol (Parmar et al. 2022) expects:

- ``uint8`` tensors/arrays are taken as 0-255;
- float tensors/arrays need ``value_range`` = ``(lo, hi)``, e.g. ``(-1, 1)``, ``(0, 1)`` or ``(0, 255)``;
  they are mapped to 0-255 and rounded (``truncate=True`` floors instead, as DMD2 does).

Layout is ``[N, C, H, W]``; ``[N, H, W, C]`` is recognised when dim 1 is not a channel count.
One channel is repeated to RGB, a fourth (alpha) channel is dropped, as PIL's ``convert("RGB")`` does.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Union

import numpy as np
import torch
from PIL import Image

from distill.metrics._util import first_line
from distill.metrics.finite import require_finite
from distill.metrics.stats import Stats
from distill.models.errors import ToolkitError

# clean-fid's list (utils.EXTENSIONS) without .npy; matched case-insensitively.
IMAGE_EXTENSIONS = frozenset({".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"})
ValueRange = tuple[float, float]
ImageBatchFn = Callable[[int], Union[torch.Tensor, np.ndarray]]


def list_images(root: Path) -> list[Path]:
    """Image files under ``root`` (recursive), sorted by path as clean-fid sorts them."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def check_image_files(files: list[Path]) -> None:
    """Read each file's header (not its pixels): catches missing, empty and non-image files early."""
    for file in files:
        try:
            with Image.open(file) as image:
                image.size  # noqa: B018
        except Exception as err:
            raise ToolkitError(f"cannot read image {file}: {first_line(err)}") from None


def to_uint8(images: torch.Tensor, value_range: ValueRange | None = None, truncate: bool = False,
             what: str = "images") -> torch.Tensor:
    """Quantise a ``[B, 3, H, W]`` batch to uint8 0-255 (round, or floor with ``truncate``).

    Raises :class:`ToolkitError` with the count when float images hold NaN or inf (a NaN would
    otherwise become pixel 0 and give a finite, wrong FID).
    """
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        return images.clamp(0, 255).to(torch.uint8)
    require_finite(images, what)
    if value_range is None:
        raise ToolkitError("float images need value_range, e.g. (-1, 1), (0, 1) or (0, 255)")
    lo, hi = value_range
    if images.element_size() < 4:  # float16/bfloat16 cannot hold x * 127.5 precisely enough to round right
        images = images.float()
    x = (images - lo) * (255.0 / (hi - lo))
    x = x.clamp_(0, 255)
    return (x.floor_() if truncate else x.round_()).to(torch.uint8)


def as_rgb_nchw(images: torch.Tensor | np.ndarray, what: str = "images") -> torch.Tensor:
    """View images as ``[N, 3, H, W]``: recognise NHWC, repeat grey, drop alpha."""
    x = torch.as_tensor(images)
    if x.ndim == 3:  # a single image or a batch of grey images: ambiguous, ask for 4-d
        raise ToolkitError(f"{what} must be 4-d [N, C, H, W] (or [N, H, W, C]), got shape {tuple(x.shape)}")
    if x.ndim != 4:
        raise ToolkitError(f"{what} must be 4-d [N, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3, 4) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2)
    channels = x.shape[1]
    if channels == 1:
        return x.expand(-1, 3, -1, -1)
    if channels == 4:
        return x[:, :3]
    if channels != 3:
        raise ToolkitError(f"{what} have {channels} channels; expected 1, 3 or 4 (shape {tuple(x.shape)})")
    return x


def _check_range(batch: torch.Tensor, value_range: ValueRange | None, what: str) -> None:
    if value_range is None or not batch.is_floating_point():
        return
    lo, hi = value_range
    slack = 0.5 * (hi - lo)
    low, high = batch.min().item(), batch.max().item()
    if low < lo - slack or high > hi + slack:
        warnings.warn(
            f"{what} span [{low:.3g}, {high:.3g}], far outside value_range ({lo}, {hi}); is value_range right?",
            UserWarning,
            stacklevel=4,
        )


def _shard(n: int, rank: int, world_size: int) -> range:
    return range(rank, n, world_size)


@dataclass
class FolderSource:
    """Image files under a folder (png, jpg, webp, ...; recursive), read as RGB like clean-fid."""

    root: Path
    files: list[Path]

    @classmethod
    def open(cls, path: str | Path, min_count: int = 2) -> "FolderSource":
        root = Path(path)
        if not root.exists():
            raise ToolkitError(f"path not found: {root}")
        if not root.is_dir():
            raise ToolkitError(f"{root} is not a folder")
        files = list_images(root)
        if not files:
            kinds = ", ".join(sorted(e[1:] for e in IMAGE_EXTENSIONS))
            raise ToolkitError(f"no images ({kinds}) found in {root}")
        if len(files) < min_count:
            raise ToolkitError(f"{root} holds {len(files)} image(s); at least {min_count} are needed")
        check_image_files(files)
        return cls(root=root, files=files)

    def __len__(self) -> int:
        return len(self.files)

    def describe(self) -> str:
        return str(self.root)

    def batches(
        self,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[torch.Tensor]:
        """uint8 batches; or, with ``transform``, batches of ``transform(image[None])`` computed in the workers."""
        files = [self.files[i] for i in _shard(len(self.files), rank, world_size)]
        loader = torch.utils.data.DataLoader(
            _DecodedImages(files, transform),
            batch_size=batch_size,
            num_workers=num_workers,
            collate_fn=_collate,
        )
        for items in loader:
            if isinstance(items, str):  # a decode error from a worker, passed back as text
                raise ToolkitError(items)
            if isinstance(items, torch.Tensor):
                yield items
                continue
            # images of one batch differ in size: yield runs of equal size
            start = 0
            for end in range(1, len(items) + 1):
                if end == len(items) or items[end].shape != items[start].shape:
                    yield torch.stack(items[start:end])
                    start = end


def _collate(items: list[torch.Tensor | str]) -> torch.Tensor | list[torch.Tensor] | str:
    """Stack in the worker when sizes agree (one shared-memory transfer per batch), else keep a list."""
    for item in items:
        if isinstance(item, str):
            return item
    if all(item.shape == items[0].shape for item in items):
        return torch.stack(items)
    return items


class _DecodedImages(torch.utils.data.Dataset):
    """Decodes a file to uint8 ``[3, H, W]`` with ``Image.open(...).convert("RGB")`` (clean-fid's reader)."""

    def __init__(self, files: list[Path], transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor | str:
        path = self.files[index]
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except Exception as err:  # returned, not raised: worker exceptions arrive as multi-line text
            return f"cannot read image {path}: {first_line(err)}"
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return image if self.transform is None else self.transform(image[None])[0]


@dataclass
class TensorSource:
    """In-memory images: a tensor or array, uint8 0-255 or float in ``value_range``."""

    images: torch.Tensor
    value_range: ValueRange | None = None
    truncate: bool = False

    @classmethod
    def open(cls, images, value_range: ValueRange | None = None, truncate: bool = False, min_count: int = 2) -> "TensorSource":
        x = as_rgb_nchw(images)
        if x.shape[0] < min_count:
            raise ToolkitError(f"{x.shape[0]} image(s) given; at least {min_count} are needed")
        if x.is_floating_point() and value_range is None:
            raise ToolkitError("float images need value_range, e.g. (-1, 1), (0, 1) or (0, 255)")
        require_finite(x, "images")  # up front, before any network loads
        return cls(images=x, value_range=value_range, truncate=truncate)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def describe(self) -> str:
        return f"tensor {list(self.images.shape)} {str(self.images.dtype).replace('torch.', '')}"

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> Iterator[torch.Tensor]:
        shard = self.images[rank::world_size]
        for start in range(0, shard.shape[0], batch_size):
            batch = shard[start : start + batch_size]
            if start == 0:
                _check_range(batch, self.value_range, "images")
            yield to_uint8(batch, self.value_range, self.truncate)


@dataclass
class GeneratorSource:
    """Images made on the fly by ``fn(batch_size) -> images``, ``num_samples`` in all (no PNGs written).

    Under ``torch.distributed`` every process draws its share, so ``fn`` must give different samples
    in each process (seed it by rank).
    """

    fn: ImageBatchFn
    num_samples: int
    value_range: ValueRange | None = None
    truncate: bool = False

    @classmethod
    def open(cls, fn, num_samples: int | None, value_range=None, truncate=False, min_count: int = 2) -> "GeneratorSource":
        if not callable(fn):
            raise ToolkitError(f"expected a callable fn(batch_size) -> images, got {type(fn).__name__}")
        if num_samples is None or int(num_samples) < min_count:
            raise ToolkitError(f"a generator source needs num_samples >= {min_count}, got {num_samples}")
        return cls(fn=fn, num_samples=int(num_samples), value_range=value_range, truncate=truncate)

    def __len__(self) -> int:
        return self.num_samples

    def describe(self) -> str:
        return f"generator {getattr(self.fn, '__qualname__', type(self.fn).__name__)} x {self.num_samples}"

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> Iterator[torch.Tensor]:
        remaining = len(_shard(self.num_samples, rank, world_size))
        first, done = True, 0
        while remaining > 0:
            count = min(batch_size, remaining)
            with torch.no_grad():
                batch = as_rgb_nchw(self.fn(count), what="generated images")
            if batch.shape[0] != count:
                raise ToolkitError(f"generator returned {batch.shape[0]} images when asked for {count}")
            if first:
                if batch.is_floating_point() and self.value_range is None:
                    raise ToolkitError("the generator returns float images: pass value_range, e.g. (-1, 1) or (0, 1)")
                _check_range(batch, self.value_range, "generated images")
                first = False
            yield to_uint8(batch, self.value_range, self.truncate,
                           what=f"generated images (batch of samples {done}..{done + count - 1} of this process)")
            remaining -= count
            done += count


ImageSource = Union[FolderSource, TensorSource, GeneratorSource]
Source = Union[ImageSource, Stats]


def open_source(
    obj,
    *,
    num_samples: int | None = None,
    value_range: ValueRange | None = None,
    truncate: bool = False,
    min_count: int = 2,
) -> Source:
    """Turn what a user passed into a validated source.

    - a folder path: :class:`FolderSource`;
    - a ``.npz`` path: :class:`Stats` if it holds ``mu``/``sigma``, else images (``arr_0`` [N, H, W, 3]
      uint8, the ADM/EDM reference-batch layout);
    - a :class:`Stats`, or an already opened source: itself;
    - a tensor or array: :class:`TensorSource`; a callable: :class:`GeneratorSource` (needs ``num_samples``).
    """
    if isinstance(obj, (Stats, FolderSource, TensorSource, GeneratorSource)):
        return obj
    if isinstance(obj, (str, Path)):
        path = Path(obj)
        if path.is_dir() or not path.exists():
            return FolderSource.open(path, min_count=min_count)
        if path.suffix.lower() == ".npz":
            return _open_npz(path, min_count)
        raise ToolkitError(f"{path} is neither an image folder nor an .npz file")
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return TensorSource.open(obj, value_range, truncate, min_count=min_count)
    if callable(obj):
        return GeneratorSource.open(obj, num_samples, value_range, truncate, min_count=min_count)
    raise ToolkitError(f"cannot read images from a {type(obj).__name__}: pass a folder, an .npz, a tensor or a callable")


def _open_npz(path: Path, min_count: int) -> Source:
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = list(data.files)
            images = data[keys[0]] if len(keys) == 1 and keys[0] != "mu" else None
    except Exception as err:
        raise ToolkitError(f"cannot read {path}: {first_line(err)}") from None
    if images is not None and images.ndim == 4:
        return TensorSource.open(images, min_count=min_count)
    return Stats.load(path)
