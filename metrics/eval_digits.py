"""The digits classifier as a ``distill eval`` extractor, and the real digits as a built-in reference.

* :class:`DigitsImageFeatures` -- the 64-d penultimate features of :class:`metrics.digits.DigitsClassifier`
  behind the evaluator's ``raw_input`` contract: the generated uint8 batch ``[N, 3, H, W]`` goes to
  ``[-1, 1]``, its channel mean is taken and, for other sizes than 8x8, it is area-resized to 8x8
  (no 299 px Inception resize in between), so ``distill eval``'s ``fid`` with these features is the
  *digits FD* of ``distill demo``'s report (:func:`metrics.digits.digits_report`) up to the uint8
  quantisation of the images. Registered as the extractor ``digits`` (``--features digits``,
  ``fd_digits``).
* ``--ref sklearn-digits`` -- all 1,797 digits that ship with scikit-learn (no files needed), read
  through the same uint8 path as the generated images.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.metrics.digits import FEATURE_DIM, DigitsClassifier
from distill.metrics.sources import TensorSource

#: the ``--ref`` value naming the built-in reference (a path of that name is not looked for)
SKLEARN_DIGITS = "sklearn-digits"


class DigitsImageFeatures(nn.Module):
    """uint8 ``[N, 3, H, W]`` (0-255) -> ``[N, 64]`` penultimate features of the digits classifier."""

    raw_input = True
    feature_dim = FEATURE_DIM
    name = "digits-classifier-penultimate"
    transform = "uint8 / 127.5 - 1, channel mean, area resize to 8x8 (no Inception resize)"

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float() / 127.5 - 1.0)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, 10]`` from this extractor's features ``[N, 64]`` (the ``accuracy`` metric)."""
        return self.classifier.out(features)


def load_digits_features(options: dict, device: torch.device) -> DigitsImageFeatures:
    """The extractor loader (``metrics.eval.EXTRACTORS['digits']``): the cached classifier (trained once,
    ~15 s on a CPU core, in ``$DISTILL_CACHE`` or ``~/.cache/distill``; ``options['digits_cache']`` overrides).
    Under ``torch.distributed`` the first process makes the cache file before the others read it."""
    import torch.distributed as dist

    from distill.metrics.digits import load_digits_classifier

    cache = options.get("digits_cache")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # the first process trains and caches it; the others read that file (two writers of one .tmp file race)
        if dist.get_rank() == 0:
            load_digits_classifier(cache)
        dist.barrier()
    return DigitsImageFeatures(load_digits_classifier(cache)).to(device)


class _DigitsSource(TensorSource):
    def describe(self) -> str:
        return f"{SKLEARN_DIGITS} ({len(self)} images, 8x8, sklearn.datasets.load_digits)"


def digits_reference_source() -> TensorSource:
    """The 1,797 real digits as uint8 RGB ``[N, 3, 8, 8]`` (``[-1, 1]`` mapped to 0-255 and rounded)."""
    from distill.digits_data import load_digits_tensors

    images = load_digits_tensors()[0]
    return _DigitsSource.open(images, value_range=(-1.0, 1.0))
