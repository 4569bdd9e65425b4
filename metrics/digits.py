"""The digits metric: a small classifier trained on scikit-learn's digits judges generated 8x8 digits.

* :class:`DigitsClassifier` -- a 3-layer CNN (98-99% test accuracy on the 297 held-out digits); its
  penultimate layer (64-d, after the activation) is the feature space, as Inception's pool3 is for FID.
* :func:`load_digits_classifier` -- trains it once (deterministic for a seed, ~15 s on a CPU core) and
  caches the weights (``$DISTILL_CACHE`` or ``~/.cache/distill``).
* :func:`digits_report` -- for generated images and the labels they were asked for: the Frechet distance
  to all 1,797 real digits in those features ("digits FD", Heusel et al. 2017), class accuracy (does a
  sample drawn for label 3 read as a 3), and precision / recall (Kynkaanniemi et al. 2019, k = 3).
* :class:`DigitsExtractor` -- the same features behind the metrics module's ``raw_input`` extractor contract
  (uint8 ``[N, C, H, W]`` -> ``[N, 64]``, no Inception resize), so ``metrics.fid(a, b, extractor=DigitsExtractor())``
  works on folders and tensors and equals :func:`digits_report`'s FD up to the uint8 quantisation; it is
  also ``distill eval``'s ``--features digits``.

Images are ``[N, 1, 8, 8]`` floats in [-1, 1] (the teacher's range); other sizes are area-resized to 8x8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.metrics.precision_recall import precision_recall
from distill.metrics.stats import frechet_distance

FEATURE_DIM = 64


class DigitsClassifier(nn.Module):
    """``[N, 1, 8, 8]`` in [-1, 1] -> logits ``[N, 10]``; :meth:`features` gives the 64-d penultimate layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(),
                                  nn.AvgPool2d(2), nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2))
        self.fc = nn.Linear(64 * 4, FEATURE_DIM)
        self.out = nn.Linear(FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = _as_digits(x)
        return F.silu(self.fc(self.conv(x).flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.features(x))


def _as_digits(x: torch.Tensor) -> torch.Tensor:
    """Any ``[N, C, H, W]`` in [-1, 1] -> ``[N, 1, 8, 8]`` (channel mean, area resize)."""
    x = x.float()
    if x.shape[1] != 1:
        x = x.mean(1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.adaptive_avg_pool2d(x, 8)
    return x


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One-pixel random shifts and mild pixel noise: generated digits are neither centred nor clean like UCI's."""
    shifts = torch.randint(-1, 2, (2,), generator=g).tolist()
    x = torch.roll(F.pad(x, (1, 1, 1, 1), value=-1.0), shifts, dims=(2, 3))[:, :, 1:-1, 1:-1]
    return x + 0.1 * torch.randn(x.shape, generator=g)


def train_digits_classifier(seed: int = 0, epochs: int = 40, progress: bool = False) -> tuple[DigitsClassifier, float]:
    """Train on the first 1,500 digits; return the classifier and its accuracy on the 297 held out."""
    from distill.digits_data import HOLDOUT, load_digits_tensors

    images, labels = load_digits_tensors()
    train_x, train_y, test_x, test_y = images[:-HOLDOUT], labels[:-HOLDOUT], images[-HOLDOUT:], labels[-HOLDOUT:]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DigitsClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * (len(train_x) // 100 + 1))
    it = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="digits classifier", unit="epoch")
    for _ in it:
        order = torch.randperm(len(train_x), generator=g)
        for start in range(0, len(train_x), 100):
            idx = order[start:start + 100]
            loss = F.cross_entropy(model(_augment(train_x[idx], g)), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    model.eval().requires_grad_(False)
    with torch.no_grad():
        accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
    return model, accuracy


def load_digits_classifier(cache: str | Path | None = None, seed: int = 0, progress: bool = False) -> DigitsClassifier:
    """The cached classifier (trained on first use). ``.test_accuracy`` holds its held-out accuracy."""
    from safetensors.torch import load_file, save_file

    from distill.digits_data import cache_root

    path = cache_root(cache) / f"digits_classifier_seed{seed}.safetensors"
    model = DigitsClassifier()
    if path.is_file():
        state = load_file(str(path))
        accuracy = float(state.pop("test_accuracy").item())
        model.load_state_dict(state)
        model.eval().requires_grad_(False)
    else:
        model, accuracy = train_digits_classifier(seed, progress=progress)
        tmp = path.with_suffix(".tmp")
        save_file({**{k: v.contiguous() for k, v in model.state_dict().items()},
                   "test_accuracy": torch.tensor(accuracy)}, str(tmp))
        tmp.replace(path)  # atomic: a concurrent reader never sees half a file
    model.test_accuracy = accuracy
    return model


class DigitsExtractor(nn.Module):
    """The metrics module's extractor contract for digits: uint8 ``[N, C, H, W]`` (0-255) -> ``[N, 64]``.

    ``raw_input = True``: :mod:`metrics.fid` (and ``distill eval``) pass the uint8 images as they are, with no
    299 px Inception resize; they go to ``[-1, 1]``, their channel mean is taken and other sizes than 8x8 are
    area-resized to 8x8. So ``metrics.fid(a, b, extractor=DigitsExtractor())`` is :func:`digits_report`'s
    digits FD up to the uint8 quantisation of the images, at the cost of the classifier alone.
    """

    raw_input = True
    feature_dim = FEATURE_DIM
    name = "digits-classifier-penultimate"
    transform = "uint8 / 127.5 - 1, channel mean, area resize to 8x8 (no Inception resize)"

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        self.classifier = classifier or load_digits_classifier()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float() / 127.5 - 1.0)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]`` from this extractor's features ``[N, 64]`` (``distill eval``'s ``accuracy``)."""
        return self.classifier.out(features)


@torch.no_grad()
def digits_features(images: torch.Tensor, classifier: DigitsClassifier, batch_size: int = 1000) -> torch.Tensor:
    """Penultimate features ``[N, 64]`` (float64) of images in [-1, 1]."""
    out = [classifier.features(images[i:i + batch_size].cpu()) for i in range(0, len(images), batch_size)]
    return torch.cat(out).double()


def feature_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between two feature sets ``[N, D]`` (means and unbiased covariances)."""
    def stats(x):
        x = x.double()
        return x.mean(0), torch.cov(x.T)
    return float(frechet_distance(*stats(a), *stats(b)))


@dataclass
class DigitsScores:
    fd: float
    accuracy: float | None
    precision: float
    recall: float
    n: int

    def as_dict(self) -> dict:
        return {"digits_fd": self.fd, "class_accuracy": self.accuracy, "precision": self.precision,
                "recall": self.recall, "n": self.n}


_REAL_CACHE: dict[int, torch.Tensor] = {}


def real_digits_features(classifier: DigitsClassifier) -> torch.Tensor:
    """Features of all 1,797 real digits (cached per classifier object)."""
    key = id(classifier)
    if key not in _REAL_CACHE:
        from distill.digits_data import load_digits_tensors

        _REAL_CACHE.clear()
        _REAL_CACHE[key] = digits_features(load_digits_tensors()[0], classifier)
    return _REAL_CACHE[key]


@torch.no_grad()
def digits_report(images: torch.Tensor, labels: torch.Tensor | None = None,
                  classifier: DigitsClassifier | None = None, k: int = 3) -> DigitsScores:
    """Digits FD, class accuracy and precision/recall of generated ``images`` ([N, 1, 8, 8] in [-1, 1]).

    Args:
        labels: the class each image was generated for (None: unconditional, accuracy is None).
        k: nearest-neighbour count of the precision/recall manifolds (Kynkaanniemi et al. 2019 use 3).
    Use >= 1,000 samples: with fewer, the FD's covariance estimate dominates (1,797 real digits).
    """
    classifier = classifier or load_digits_classifier()
    if not torch.isfinite(images).all():
        raise ValueError("generated digits contain NaN or inf; refusing to score them")
    fake = digits_features(images, classifier)
    real = real_digits_features(classifier)
    accuracy = None
    if labels is not None:
        predicted = torch.cat([classifier(images[i:i + 1000].cpu()).argmax(1) for i in range(0, len(images), 1000)])
        accuracy = (predicted == labels.cpu()).float().mean().item()
    precision, recall = precision_recall(real, fake, k=k)
    return DigitsScores(feature_fd(fake, real), accuracy, precision, recall, len(images))


def two_sample_floor(classifier: DigitsClassifier | None = None, seed: int = 0) -> DigitsScores:
    """The scores of real digits against all real digits: half of the set (898), a reference for "perfect".

    FD of a finite sample is biased upward; a model cannot be expected to beat this floor at the same n.
    """
    from distill.digits_data import load_digits_tensors

    images, labels = load_digits_tensors()
    idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[: len(images) // 2]
    return digits_report(images[idx], labels[idx], classifier)
