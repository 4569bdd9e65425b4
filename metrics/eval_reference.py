"""Reference statistics (and features) for ``distill eval``: from an image folder, with a cache, or a ``.npz``.

A reference folder is passed through each extractor once; the result (``Stats`` and, for
precision/recall, the feature rows) is cached under a key made of the folder's file list (relative
paths, sizes, modification times) and the extractor's name, weights hash and transform, so a second
evaluation against the same reference skips the reference pass. Under ``torch.distributed`` every
process reads its share, the main process writes the cache, and all wait for it.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from distill.metrics.fid import _Extractor, feature_batches
from distill.metrics.kid import _gathered
from distill.metrics.sources import FolderSource, TensorSource
from distill.metrics.stats import RunningStats, Stats
from distill.models.errors import ToolkitError

CACHE_ENV = "DISTILL_EVAL_CACHE"


def default_cache_dir() -> Path:
    """``$DISTILL_EVAL_CACHE``, else ``~/.cache/distill/eval-reference``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distill" / "eval-reference")


@dataclass
class Reference:
    """Reference statistics of one extractor, with the feature rows when a metric needs them."""

    stats: Stats
    features: torch.Tensor | None = None
    cached: bool = False  # read from the cache (no reference pass)


def folder_key(source: FolderSource, feature: _Extractor) -> str:
    """Cache key: the folder's files (relative path, size, mtime) and the extractor's identity."""
    digest = hashlib.sha256()
    for path in source.files:
        info = path.stat()
        digest.update(f"{path.relative_to(source.root)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    identity = {"extractor": feature.name, "weights": feature.weights_hash,
                "transform": getattr(feature.fn, "transform", "clean-fid")}
    digest.update(json.dumps(identity, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def _rank() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def folder_reference(source: FolderSource | TensorSource, feature: _Extractor, *, need_features: bool, batch_size: int,
                     num_workers: int | None, cache_dir: Path | None, progress: bool) -> Reference:
    """Statistics (and features) of ``source`` under ``feature``, from the cache when present."""
    stats_path = features_path = None
    if cache_dir is not None and isinstance(source, FolderSource):  # in-memory references (digits) are not cached
        key = folder_key(source, feature)
        stats_path, features_path = cache_dir / f"{key}.npz", cache_dir / f"{key}.features.npy"
        if stats_path.is_file() and (not need_features or features_path.is_file()):
            stats = Stats.load(stats_path)
            features = torch.from_numpy(np.load(features_path)) if need_features else None
            return Reference(stats, features, cached=True)
    running, rows = RunningStats(feature.device), []
    for batch in feature_batches(source, feature, batch_size, num_workers, progress):
        running.update(batch)
        if need_features:
            rows.append(batch.cpu())
    running.all_reduce()
    manifest = {"source": source.describe(), "count": running.n, "extractor": feature.name,
                "weights_sha256": feature.weights_hash, "transform": getattr(feature.fn, "transform", "clean-fid"),
                "feature_dim": int(running.total.shape[0])}
    stats = running.finalize(manifest)
    stats.origin = source.describe()
    features = None
    if need_features:  # rows in file order whatever the number of processes (KID draws subsets by row)
        features = _gathered(torch.cat(rows)).double()
        world = _rank()[1]
        order = torch.tensor([i for r in range(world) for i in range(r, len(source), world)])
        features = features[order.argsort()]
    if stats_path is not None and _rank()[0] == 0:
        stats_path.parent.mkdir(parents=True, exist_ok=True)
        if need_features:
            np.save(features_path, features.numpy())
        stats.save(stats_path)  # written last: its presence means the entry is complete
    if _rank()[1] > 1:
        dist.barrier()
    return Reference(stats, features)


def match_stats_file(files: list[Stats], feature: _Extractor, metric: str) -> Stats:
    """The given statistics file made with this extractor: same weights hash, else (no hash) same dimension."""
    dim = getattr(feature.fn, "feature_dim", None)
    for stats in files:
        made_with = stats.manifest.get("weights_sha256")
        if made_with and feature.weights_hash and made_with == feature.weights_hash:
            return stats
    for stats in files:
        if not stats.manifest.get("weights_sha256") and dim is not None and stats.dim == dim:
            return stats
    if dim is None and len(files) == 1:  # an extractor of unknown size (identity): the one file given
        return files[0]
    given = ", ".join(f"{s.origin} ({s.dim}-d)" for s in files)
    raise ToolkitError(f"no reference statistics for {metric} ({feature.name}, {dim}-d features) among {given}; "
                       f"pass a reference image folder or statistics made with this extractor")
