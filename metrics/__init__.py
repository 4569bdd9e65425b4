"""Evaluation: FID with clean-fid parity and CLIP score.

Public API::

    metrics.fid(a, b, ...)                        # FID between folders / .npz / tensors / generators
    metrics.compute_stats(source, ...).save(path) # reference statistics (.npz with a manifest)
    metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    metrics.kid(a, b, ...)                        # KID (polynomial-kernel MMD, clean-fid's estimator)
    metrics.clip_score(images, prompts, ...)      # CLIPScore, "cosine" (DMD2) or "torchmetrics"
    metrics.fid(a, b, extractor=metrics.load_dinov2(path))  # FD-DINOv2 (dgm-eval's features)
    metrics.precision_recall(real_feats, fake_feats, k=3)   # Kynkaanniemi et al. 2019 -> (precision, recall)
    metrics.precision_recall_images(generated, reference)   # the same on image sources
    metrics.diversity(features, prompts)          # mean pairwise feature distance within a prompt

FID follows clean-fid's ``clean`` mode (Parmar et al. 2022) with the Frechet distance of Heusel et
al. 2017; CLIP score follows Hessel et al. 2021. The functions ``metrics.fid`` and
``metrics.clip_score`` shadow their modules of the same name: import module internals with
``from distill.metrics.fid import ...`` or ``importlib.import_module("distill.metrics.fid")``.
"""
from distill.metrics.clip_score import DMD2_PREFIX, ClipModel, load_clip, read_prompts
from distill.metrics.fid import compute_stats, extract_features
from distill.metrics.kid import kernel_distance, kid
from distill.metrics.dinov2 import DINOV2_ENV, Dinov2Features, load_dinov2
from distill.metrics.diversity import diversity
from distill.metrics.precision_recall import precision_recall, precision_recall_images
from distill.metrics.inception import INCEPTION_ENV, INCEPTION_URL, clean_resize, find_inception_weights, load_inception
from distill.metrics.sources import FolderSource, GeneratorSource, TensorSource, open_source
from distill.metrics.stats import RunningStats, Stats, frechet_distance
from distill.metrics.clip_score import clip_score  # noqa: E402 - after the module import it shadows
from distill.metrics.fid import fid  # noqa: E402

__all__ = [
    "ClipModel",
    "DINOV2_ENV",
    "Dinov2Features",
    "diversity",
    "load_dinov2",
    "precision_recall",
    "precision_recall_images",
    "DMD2_PREFIX",
    "FolderSource",
    "GeneratorSource",
    "INCEPTION_ENV",
    "INCEPTION_URL",
    "RunningStats",
    "Stats",
    "TensorSource",
    "clean_resize",
    "clip_score",
    "compute_stats",
    "extract_features",
    "fid",
    "kernel_distance",
    "kid",
    "find_inception_weights",
    "frechet_distance",
    "load_clip",
    "load_inception",
    "open_source",
    "read_prompts",
]
