"""Score generated samples against a reference in one pass: FID, FD-DINOv2, KID, precision/recall,
CLIP score and diversity, all on the same images, never written to disk unless asked.

:class:`Evaluator` is the engine behind ``distill eval`` and in-training evaluation:

1. ``Evaluator(metrics, reference, ...)`` checks every option and input (metric names, the reference
   folder or ``.npz`` files, numeric options) without loading a network;
2. ``prepare()`` loads the extractors and makes (or reads from the cache) the reference statistics;
3. ``score(batches)`` takes this process's batches ``(indices, samples, prompts)`` and returns the
   metrics, identical on every process (statistics are all-reduced, features and scores gathered).

Feature extractors are pluggable: ``fid`` uses ``inception``, ``fd_<name>`` the extractor ``<name>``
(``fd_dinov2`` built in), ``pr``/``kid``/``diversity`` the extractor named by ``pr_features`` /
``diversity_features``. :func:`register_extractor` adds one (a digits classifier, say) by name; the
command line takes ``--extractor NAME=module:function``. An extractor maps a uint8 batch
``[N, 3, H, W]`` (or, with ``raw_input = True``, whatever the generator returns, e.g. toy vectors) to
features ``[N, D]`` (see :mod:`metrics.fid`).
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from distill.metrics._util import check_int, resolve_device
from distill.metrics.diversity import DISTANCES, diversity
from distill.metrics.eval_reference import Reference, default_cache_dir, folder_reference, match_stats_file
from distill.metrics.fid import _Extractor, _warn_if_incomparable, extract_features, prepare_extractor
from distill.metrics.kid import _gathered, kernel_distance
from distill.metrics.precision_recall import DEFAULT_K, precision_recall
from distill.metrics.sources import FolderSource, TensorSource
from distill.metrics.stats import RunningStats, Stats, frechet_distance
from distill.models.errors import ToolkitError

ExtractorLoader = Callable[[dict, torch.device], Callable[[torch.Tensor], torch.Tensor]]
BASE_METRICS = ("fid", "clip", "fd_dinov2", "pr", "kid", "diversity", "accuracy")


class IdentityFeatures(nn.Module):
    """Samples as their own features (toy vector data): ``[N, D]`` floats in, the same out."""

    raw_input = True
    transform = "identity (samples are the features)"
    name = "identity"
    weights_hash = "identity"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).float()


def _load_inception(options: dict, device: torch.device):
    from distill.metrics.inception import load_inception

    return load_inception(options.get("inception"), device)


def _load_dinov2(options: dict, device: torch.device):
    from distill.metrics.dinov2 import load_dinov2

    return load_dinov2(options.get("dinov2"), device)


def _load_digits(options: dict, device: torch.device):
    from distill.metrics.eval_digits import load_digits_features

    return load_digits_features(options, device)


EXTRACTORS: dict[str, ExtractorLoader] = {
    "inception": _load_inception,
    "dinov2": _load_dinov2,
    "digits": _load_digits,  # the digits classifier's penultimate features (class-conditional digits students)
    "identity": lambda options, device: IdentityFeatures(),
}


def register_extractor(name: str, loader: ExtractorLoader) -> None:
    """Make ``fd_<name>`` (and ``pr_features=name``, ``diversity_features=name``) available.

    ``loader(options, device)`` returns the extractor; ``options`` holds the evaluator's keyword
    arguments (paths such as ``inception``, ``dinov2``, or your own).
    """
    if not name.isidentifier():
        raise ToolkitError(f"extractor name {name!r} must be an identifier (it becomes the metric fd_{name})")
    EXTRACTORS[name] = loader


def load_extractor_spec(spec: str) -> str:
    """``NAME=module:function`` (the function is the loader, or returns the extractor when called with no
    arguments) -> registers it and returns NAME."""
    name, _, target = spec.partition("=")
    module_name, _, attr = target.partition(":")
    if not (name and module_name and attr):
        raise ToolkitError(f"--extractor {spec!r}: expected NAME=module:function")
    try:
        function = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ToolkitError(f"--extractor {spec!r}: cannot import {module_name}:{attr} ({err})") from None

    def loader(options: dict, device: torch.device):
        try:
            return function(options, device)
        except TypeError:
            return function()

    register_extractor(name, loader)
    return name


def metric_extractor(metric: str, pr_features: str, diversity_features: str, fid_features: str = "inception") -> str | None:
    """The extractor a metric needs (None for CLIP score)."""
    if metric == "fid":
        return fid_features
    if metric.startswith("fd_"):
        return metric[3:]
    if metric in ("pr", "kid"):
        return pr_features if metric == "pr" else fid_features  # KID: the FID features (Inception by default)
    if metric == "diversity":
        return diversity_features
    if metric == "accuracy":  # class accuracy: the classifier behind the fid features (digits)
        return fid_features
    return None


class Evaluator:
    """Metrics of generated samples against a reference (see the module docstring).

    Args:
        metrics: names from ``fid, clip, fd_dinov2, pr, kid, diversity, accuracy`` or ``fd_<registered extractor>``
            (``accuracy``: class accuracy of class-conditional students, with a ``classify`` extractor: digits).
        reference: an image folder (every metric; cached), ``"sklearn-digits"`` (the 1,797 real digits,
            :mod:`metrics.eval_digits`), or one or more ``.npz`` statistics files (Frechet metrics only,
            matched to extractors by weights hash, else by dimension).
        inception, dinov2: local weights (file or folder) of the built-in extractors.
        extractors: ``{name: extractor}`` objects to use instead of loading by name (tests, notebooks).
        fid_features: the extractor behind ``fid`` and ``kid`` (Inception; ``identity`` for toy vector data,
            ``digits`` for digits students).
        pr_features, diversity_features: extractor for precision/recall and diversity (default inception).
        pr_k: neighbourhood size of precision/recall (Kynkaanniemi et al.: 3).
        clip_model: a :class:`metrics.clip_score.ClipModel`, else ``clip_name``/``clip_pretrained`` are loaded.
        clip_convention, clip_prefix: as in :func:`metrics.clip_score`.
        batch_size, num_workers: of the reference pass. cache_dir: reference cache (None: no cache).
    """

    def __init__(self, metrics: Sequence[str], reference, *, inception=None, dinov2=None,
                 extractors: dict | None = None, fid_features: str = "inception", pr_features: str = "inception", diversity_features: str = "inception",
                 diversity_distance: str = "cosine", pr_k: int = DEFAULT_K, clip_model=None, clip_name: str | None = None,
                 clip_pretrained: str | None = None, clip_convention: str = "cosine", clip_prefix: str = "",
                 batch_size: int = 64, num_workers: int | None = None, cache_dir: str | os.PathLike | None = "default",
                 device=None, progress: bool = True, options: dict | None = None):
        from distill.metrics.clip_score import CONVENTIONS, DEFAULT_MODEL, DEFAULT_PRETRAINED

        self.metrics = list(dict.fromkeys(metrics))
        if not self.metrics:
            raise ToolkitError("no metrics asked for; choose from " + ", ".join(BASE_METRICS))
        self.given = dict(extractors or {})
        known = set(EXTRACTORS) | set(self.given)
        for name in (pr_features, diversity_features, fid_features):
            if name not in known:
                raise ToolkitError(f"unknown extractor {name!r}; known: {', '.join(sorted(known))}")
        for metric in self.metrics:
            if metric not in BASE_METRICS and not (metric.startswith("fd_") and metric[3:] in known):
                raise ToolkitError(f"unknown metric {metric!r}; choose from {', '.join(BASE_METRICS)} or fd_<extractor> "
                                   f"(extractors: {', '.join(sorted(known))})")
        if clip_convention not in CONVENTIONS:
            raise ToolkitError(f"unknown CLIP score convention {clip_convention!r}; choose {' or '.join(CONVENTIONS)}")
        if diversity_distance not in DISTANCES:
            raise ToolkitError(f"unknown diversity distance {diversity_distance!r}; choose {' or '.join(DISTANCES)}")
        check_int(pr_k, "pr_k", 1)
        check_int(batch_size, "batch_size", 1)
        check_int(num_workers, "num_workers", 0, optional=True)
        self.pr_features, self.diversity_features, self.pr_k = pr_features, diversity_features, pr_k
        self.diversity_distance = diversity_distance
        self.clip_model, self.clip_convention, self.clip_prefix = clip_model, clip_convention, clip_prefix
        self.clip_name = clip_name or DEFAULT_MODEL
        self.clip_pretrained = clip_pretrained if clip_name else (clip_pretrained or DEFAULT_PRETRAINED)
        self.batch_size, self.num_workers, self.progress = batch_size, num_workers, progress
        self.cache_dir = default_cache_dir() if cache_dir == "default" else (Path(cache_dir) if cache_dir else None)
        self.options = {"inception": inception, "dinov2": dinov2, **(options or {})}
        self.device = resolve_device(device)
        self.needed = {m: metric_extractor(m, pr_features, diversity_features, fid_features) for m in self.metrics}
        self.folder, self.stats_files = self._open_reference(reference)
        self._find_weights()
        self.features: dict[str, _Extractor] = {}
        self.references: dict[str, Reference] = {}
        self.clip_model_name = getattr(clip_model, "name", None)
        self.prepared = False

    # ----------------------------------------------------------------- checks (no network)
    def _open_reference(self, reference) -> tuple[FolderSource | TensorSource | None, list[Stats]]:
        needs_reference = [m for m in self.metrics if m not in ("clip", "diversity", "accuracy")]
        if not needs_reference:
            return None, []
        if reference is None or (isinstance(reference, (list, tuple)) and not reference):
            raise ToolkitError(f"{', '.join(needs_reference)} need a reference (--ref FOLDER or statistics .npz)")
        items = list(reference) if isinstance(reference, (list, tuple)) else [reference]
        if isinstance(items[0], Stats):
            return None, items
        from distill.metrics.eval_digits import SKLEARN_DIGITS, digits_reference_source

        if len(items) == 1 and str(items[0]) == SKLEARN_DIGITS:  # the built-in real digits (not cached: 1,797 8x8)
            return digits_reference_source(), []
        paths = [Path(p) for p in items]
        if len(paths) == 1 and (paths[0].is_dir() or not paths[0].exists()) and paths[0].suffix != ".npz":
            return FolderSource.open(paths[0]), []
        stats = [Stats.load(p) for p in paths]
        for metric in ("pr", "kid"):
            if metric in self.metrics:
                raise ToolkitError(f"{metric} needs the reference images' features, not statistics: pass the "
                                   f"reference image folder as --ref")
        return None, stats

    def _find_weights(self) -> None:
        """The built-in extractors' and CLIP's weight files are looked for (not loaded) now, so that a missing
        file fails in a second instead of after the generator has loaded (and, in training, been built)."""
        names = {name for name in self.needed.values() if name} - set(self.given)
        if "inception" in names and EXTRACTORS["inception"] is _load_inception:
            from distill.metrics.inception import find_inception_weights

            find_inception_weights(self.options.get("inception"))
        if "dinov2" in names and EXTRACTORS["dinov2"] is _load_dinov2:
            from distill.metrics.dinov2 import find_dinov2_weights

            find_dinov2_weights(self.options.get("dinov2"))
        if "clip" in self.metrics and self.clip_model is None:
            from distill.metrics.clip_score import resolve_model

            resolve_model(self.clip_name, self.clip_pretrained)

    def protocol(self) -> dict:
        """What the values depend on: extractors (name, weights hash, transform, dimension), reference, settings."""
        extractors = {name: {"name": f.name, "weights_sha256": f.weights_hash,
                             "transform": getattr(f.fn, "transform", None) or "clean-fid clean (299x299)",
                             "feature_dim": getattr(f.fn, "feature_dim", None)} for name, f in self.features.items()}
        reference = {name: {"origin": r.stats.origin, "count": r.stats.n, "from_cache": r.cached}
                     for name, r in self.references.items()}
        out = {"metrics": self.metrics, "extractors": extractors, "reference": reference}
        if "pr" in self.metrics:
            out["precision_recall"] = {"k": self.pr_k, "features": self.pr_features}
        if "diversity" in self.metrics:
            out["diversity"] = {"features": self.diversity_features, "distance": self.diversity_distance,
                                "groups": "images of the same prompt (different seeds)"}
        if "clip" in self.metrics:
            out["clip"] = {"model": self.clip_model_name, "convention": self.clip_convention, "prefix": self.clip_prefix}
        if "accuracy" in self.metrics:
            out["accuracy"] = {"classifier": self.needed["accuracy"],
                               "counts": "images the classifier assigns to the class they were generated for"}
        return out

    # ----------------------------------------------------------------- loading
    def prepare(self) -> "Evaluator":
        """Load the extractors (and CLIP), then the reference statistics (cached for folders)."""
        for name in dict.fromkeys(e for e in self.needed.values() if e):
            extractor = self.given.get(name)
            if extractor is None:
                extractor = EXTRACTORS[name](self.options, self.device)
            self.features[name] = prepare_extractor(extractor, None, self.device)
        if "accuracy" in self.metrics and not hasattr(self.features[self.needed["accuracy"]].fn, "classify"):
            raise ToolkitError(f"accuracy needs a classifier extractor (digits); {self.needed['accuracy']!r} has no "
                               f"classify(features)")
        if "clip" in self.metrics and self.clip_model is None:
            from distill.metrics.clip_score import load_clip

            self.clip_model = load_clip(self.clip_name, self.clip_pretrained, device=self.device)
        self.clip_model_name = getattr(self.clip_model, "name", None)
        for metric, name in self.needed.items():
            if name is None or metric in ("diversity", "accuracy") or name in self.references:
                continue
            feature = self.features[name]
            if self.folder is not None:
                need_features = any(self.needed[m] == name for m in ("pr", "kid") if m in self.metrics)
                self.references[name] = folder_reference(
                    self.folder, feature, need_features=need_features, batch_size=self.batch_size,
                    num_workers=self.num_workers, cache_dir=self.cache_dir, progress=self.progress)
            else:
                self.references[name] = Reference(match_stats_file(self.stats_files, feature, metric))
        self.prepared = True
        return self

    # ----------------------------------------------------------------- scoring
    def score(self, batches: Iterable[tuple[Sequence[int], torch.Tensor, Sequence[str] | None]],
              groups: Callable[[int], object] | None = None,
              labels: Callable[[int], int] | None = None) -> dict[str, float]:
        """Metrics of this process's batches ``(indices, samples, prompts)``; the same result on every process.

        ``groups(index)`` gives the diversity group of a sample (default: its prompt); ``labels(index)`` the class a
        sample was generated for (``accuracy``).
        """
        if not self.prepared:
            self.prepare()
        stats_names = {self.needed[m] for m in self.metrics if m == "fid" or m.startswith("fd_")}
        keep_names = {self.needed[m] for m in self.metrics if m in ("pr", "kid", "diversity", "accuracy")}
        running = {name: RunningStats(self.device) for name in stats_names}
        kept: dict[str, list[torch.Tensor]] = {name: [] for name in keep_names}
        indices_all, prompts_all, clip_scores = [], [], []
        for indices, samples, prompts in batches:
            indices_all += list(indices)
            prompts_all += list(prompts) if prompts is not None else [None] * len(indices)
            for name in stats_names | keep_names:
                feats = extract_features(samples, self.features[name].fn, self.device).double()
                if name in running:
                    running[name].update(feats)
                if name in kept:
                    kept[name].append(feats.cpu())
            if "clip" in self.metrics:
                clip_scores.append(self._clip(samples, prompts))
        values: dict[str, float] = {}
        # each extractor's sums are all-reduced once, even when two metrics read them (fid and fd_digits), and in
        # the same (sorted) order on every process: collectives must match, and set order varies with the hash seed
        finalized = {name: _finalize(running[name]) for name in sorted(running)}
        for metric in self.metrics:
            name = self.needed[metric]
            if metric == "fid" or metric.startswith("fd_"):
                stats = finalized[name]
                ref = self.references[name].stats
                _warn_if_incomparable(stats, ref)
                values[metric] = frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma)
        # features of all processes in image order, so that every value is the one a single process gets
        order = _gathered(torch.tensor(indices_all, dtype=torch.int64)).argsort()
        empty = torch.zeros(0, 0, dtype=torch.float64)
        gathered = {name: _gathered(torch.cat(kept[name]) if kept[name] else empty)[order] for name in sorted(kept)}
        if "pr" in self.metrics:
            precision, recall = precision_recall(self.references[self.pr_features].features,
                                                 gathered[self.pr_features], self.pr_k)
            values.update(precision=precision, recall=recall)
        if "kid" in self.metrics:
            values["kid"] = kernel_distance(gathered[self.needed["kid"]], self.references[self.needed["kid"]].features)
        if "clip" in self.metrics:
            scores = _gathered(torch.cat(clip_scores) if clip_scores else torch.zeros(0, dtype=torch.float64))
            values["clip"] = float(scores.mean())
        if "accuracy" in self.metrics:
            if labels is None:
                raise ToolkitError("accuracy needs the class label of every sample (class-conditional students)")
            name = self.needed["accuracy"]
            fn = self.features[name].fn
            with torch.no_grad():
                predicted = fn.classify(gathered[name].to(self.device, torch.float32)).argmax(1).cpu()
            asked = torch.tensor(_gathered_objects([labels(i) for i in indices_all]))[order]
            values["accuracy"] = float((predicted == asked).double().mean())
        if "diversity" in self.metrics:
            keys = _gathered_objects([groups(i) for i in indices_all] if groups else prompts_all)
            values["diversity"] = diversity(gathered[self.diversity_features], [keys[i] for i in order.tolist()],
                                            self.diversity_distance)
        return values

    def _clip(self, samples: torch.Tensor, prompts: Sequence[str] | None) -> torch.Tensor:
        from distill.metrics.clip_score import clip_score

        if prompts is None:
            raise ToolkitError("clip needs a prompt for every sample")
        _, scores = clip_score(samples, list(prompts), clip_model=self.clip_model, convention=self.clip_convention,
                               prefix=self.clip_prefix, batch_size=max(len(prompts), 1), device=self.device,
                               progress=False, return_scores=True)
        return scores


def _finalize(running: RunningStats) -> Stats:
    if running.total is None and dist.is_available() and dist.is_initialized():
        raise ToolkitError("a process generated no samples; use at least as many batches as processes")
    running.all_reduce()
    return running.finalize({"count": running.n})


def _gathered_objects(items: list) -> list:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    shares = [None] * dist.get_world_size()
    dist.all_gather_object(shares, items)
    return [x for share in shares for x in share]

