"""FID (Heusel et al. 2017) computed the way clean-fid computes it (Parmar et al. 2022, mode ``clean``).

Pipeline per batch: uint8 RGB -> :func:`metrics.inception.clean_resize` in float64 on the compute
device (on a CPU, folder images are resized by the decoding workers) -> float32 feature extractor
(InceptionV3 pool3 by default) -> float64 running sums
(:class:`metrics.stats.RunningStats`), all-reduced across processes -> mean/covariance ->
:func:`metrics.stats.frechet_distance`. Nothing is written to disk, so a generator can be evaluated
during training without PNGs.

A custom ``extractor`` is any callable (an ``nn.Module`` is moved to the device) mapping a float32
batch ``[N, 3, 299, 299]`` of 0-255 values to ``[N, D]`` features, the same contract as clean-fid's
``custom_feat_extractor``. Give it a ``feature_dim`` attribute to have statistics files checked
against it before any image is read. An extractor with ``raw_input = True`` (DINOv2,
:mod:`metrics.dinov2`) receives the uint8 batch ``[N, 3, H, W]`` instead and does its own resize; its
``transform`` attribute is recorded in the statistics' manifest.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from distill.metrics._util import check_int, default_workers, resolve_device
from distill.metrics.inception import CLEAN_TRANSFORM, INCEPTION_DIM, inception_input, load_inception
from distill.metrics.sources import FolderSource, ImageSource, Source, ValueRange, open_source
from distill.metrics.stats import RunningStats, Stats, frechet_distance
from distill.models.errors import ToolkitError

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class _Extractor:
    fn: FeatureExtractor
    name: str
    weights_hash: str | None
    device: torch.device


def fid(
    a,
    b,
    *,
    extractor: FeatureExtractor | None = None,
    inception_path: str | os.PathLike | None = None,
    num_samples: int | None = None,
    value_range: ValueRange | None = None,
    truncate: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> float:
    """FID between two sources: image folders, ``.npz`` statistics, tensors or generator callables.

    Args:
        a, b: each a folder, a ``.npz`` (statistics, or images as ``arr_0``), a :class:`Stats`, a uint8
            or float tensor/array ``[N, 3, H, W]``, or a callable ``fn(batch_size) -> images``.
        extractor: feature network; default the clean-fid TorchScript InceptionV3.
        inception_path: the ``inception-2015-12-05.pt`` file or its folder (else
            ``$DISTILL_INCEPTION_PATH``, else clean-fid's download folder); never downloaded.
        num_samples: how many images a callable source draws.
        value_range: ``(lo, hi)`` of float images, e.g. ``(-1, 1)``; uint8 needs none.
        truncate: floor instead of round when quantising floats to uint8 (DMD2's evaluation).
        batch_size, num_workers, device, progress: throughput knobs; device defaults to CUDA if present.

    Inputs are validated (paths, image headers, statistics dimensions) before any network loads.
    Under an initialised ``torch.distributed`` group each process reads its share and all get the
    same result.
    """
    check_run_options(batch_size, num_workers, num_samples)
    sources = [open_source(x, num_samples=num_samples, value_range=value_range, truncate=truncate) for x in (a, b)]
    needs_features = any(not isinstance(s, Stats) for s in sources)
    _check_dims(sources, *(_expected_dim(extractor) if needs_features else (None, "")))
    feature = prepare_extractor(extractor, inception_path, device) if needs_features else None
    stats = [
        s if isinstance(s, Stats) else _stats_of(s, feature, batch_size, num_workers, truncate, progress)
        for s in sources
    ]
    _check_dims(stats, None, "")
    _warn_if_incomparable(*stats)
    return frechet_distance(stats[0].mu, stats[0].sigma, stats[1].mu, stats[1].sigma)


def compute_stats(
    source,
    *,
    extractor: FeatureExtractor | None = None,
    inception_path: str | os.PathLike | None = None,
    num_samples: int | None = None,
    value_range: ValueRange | None = None,
    truncate: bool = False,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> Stats:
    """Feature mean, covariance and manifest of one source (arguments as in :func:`fid`).

    Save reference statistics with ``compute_stats(folder).save("ref.npz")``.
    """
    check_run_options(batch_size, num_workers, num_samples)
    src = open_source(source, num_samples=num_samples, value_range=value_range, truncate=truncate)
    if isinstance(src, Stats):
        _check_dims([src], *_expected_dim(extractor))
        return src
    feature = prepare_extractor(extractor, inception_path, device)
    return _stats_of(src, feature, batch_size, num_workers, truncate, progress)


def check_run_options(batch_size, num_workers, num_samples=None) -> None:
    """The throughput knobs every metric takes, checked before anything is opened or loaded."""
    check_int(batch_size, "batch_size", 1)
    check_int(num_workers, "num_workers", 0, optional=True)
    check_int(num_samples, "num_samples", 1, optional=True)


def feature_batches(source: ImageSource, feature: _Extractor, batch_size: int, num_workers: int | None,
                    progress: bool):
    """Yield feature batches ``[b, D]`` of this process's share of ``source`` (clean resize, then the extractor)."""
    rank, world_size = _process_group()
    if len(source) < world_size:
        raise ToolkitError(f"{source.describe()} has {len(source)} images, fewer than the {world_size} processes")
    if num_workers is None:
        num_workers = default_workers()
    # On a CPU the decoding workers also resize (as clean-fid's folder path does), spreading the
    # float64 resize over processes; on a GPU the uint8 images travel and are resized there.
    # Extractors with ``raw_input = True`` (DINOv2) take the uint8 images and do their own resize.
    raw = getattr(feature.fn, "raw_input", False)
    resize_in_workers = not raw and feature.device.type == "cpu" and isinstance(source, FolderSource) and num_workers > 0
    batches = source.batches(
        batch_size, rank=rank, world_size=world_size, num_workers=num_workers,
        **({"transform": inception_input} if resize_in_workers else {}),
    )
    total = len(range(rank, len(source), world_size))
    with tqdm(total=total, desc=f"features {source.describe()}", unit="img", disable=not progress or rank != 0) as bar:
        for batch in batches:
            x = batch if resize_in_workers else _extractor_input(feature.fn, batch.to(feature.device, non_blocking=True))
            yield _run_extractor(feature.fn, x)
            bar.update(batch.shape[0])


def _stats_of(
    source: ImageSource,
    feature: _Extractor,
    batch_size: int,
    num_workers: int | None,
    truncate: bool,
    progress: bool,
) -> Stats:
    running = RunningStats(feature.device)
    for features in feature_batches(source, feature, batch_size, num_workers, progress):
        running.update(features)
    running.all_reduce()
    manifest = {
        "source": source.describe(),
        "count": running.n,
        "transform": getattr(feature.fn, "transform", CLEAN_TRANSFORM),
        "quantize": "truncate" if truncate else "round",
        "extractor": feature.name,
        "weights_sha256": feature.weights_hash,
        "feature_dim": int(running.total.shape[0]),
        "processes": _process_group()[1],
    }
    stats = running.finalize(manifest)
    stats.origin = source.describe()
    return stats


def extract_features(images: torch.Tensor, extractor: FeatureExtractor, device: torch.device | str) -> torch.Tensor:
    """Features ``[N, D]`` of a uint8 batch ``[N, 3, H, W]``: clean resize in float64, extractor in float32
    (``raw_input`` extractors such as DINOv2 get the uint8 batch and resize it themselves)."""
    return _run_extractor(extractor, _extractor_input(extractor, images.to(device, non_blocking=True)))


def _extractor_input(extractor, images: torch.Tensor) -> torch.Tensor:
    """The uint8 images themselves for ``raw_input`` extractors, else the clean-fid 299 px float input."""
    return images if getattr(extractor, "raw_input", False) else inception_input(images)


@torch.no_grad()
def _run_extractor(extractor: FeatureExtractor, x: torch.Tensor) -> torch.Tensor:
    features = torch.as_tensor(extractor(x))
    if features.shape[0] != x.shape[0]:
        raise ToolkitError(f"feature extractor returned {features.shape[0]} rows for {x.shape[0]} images")
    return features.reshape(features.shape[0], -1)


def prepare_extractor(extractor, inception_path, device) -> _Extractor:
    device = resolve_device(device)
    if extractor is None:
        extractor = load_inception(inception_path, device)
    elif isinstance(extractor, nn.Module):
        extractor = extractor.to(device)
    name = getattr(extractor, "name", None) or type(extractor).__name__
    weights_hash = getattr(extractor, "weights_hash", None)
    if weights_hash is None and isinstance(extractor, nn.Module):
        weights_hash = module_sha256(extractor)
    return _Extractor(fn=extractor, name=str(name), weights_hash=weights_hash, device=device)


def module_sha256(module: nn.Module) -> str:
    """Hash of a module's parameters and buffers (names, dtypes, shapes, values)."""
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _expected_dim(extractor) -> tuple[int | None, str]:
    if extractor is None:
        return INCEPTION_DIM, "Inception"
    return getattr(extractor, "feature_dim", None), "the feature extractor"


def _check_dims(sources: list[Source], expected: int | None, what: str) -> None:
    """Statistics must agree with each other and with the extractor's feature size when known."""
    for s in sources:
        if not isinstance(s, Stats):
            continue
        if expected is None:
            expected, what = s.dim, s.origin
        elif s.dim != expected:
            raise ToolkitError(f"{s.origin} holds {s.dim}-d statistics but {what} has {expected}-d features")


def _warn_if_incomparable(first: Stats, second: Stats) -> None:
    for key in ("weights_sha256", "transform"):
        one, two = first.manifest.get(key), second.manifest.get(key)
        if one and two and one != two:
            warnings.warn(f"the two statistics differ in {key} ({one} vs {two}); their FID is not meaningful", UserWarning, stacklevel=3)


def _process_group() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
