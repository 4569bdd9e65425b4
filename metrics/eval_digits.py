"""The digits classifier as a ``distill eval`` extractor, and the real digits as a built-in reference.

* :func:`load_digits_features` -- :class:`metrics.digits.DigitsExtractor` (the digits classifier's 64-d
  penultimate features behind the ``raw_input`` contract, no 299 px Inception resize) as the evaluator's
  extractor ``digits`` (``--features digits``, ``fd_digits``): ``distill eval``'s ``fid`` with it is the
  *digits FD* of ``distill demo``'s report (:func:`metrics.digits.digits_report`) up to the uint8
  quantisation of the images.
* ``--ref sklearn-digits`` -- all 1,797 digits that ship with scikit-learn (no files needed), read
  through the same uint8 path as the generated images.
"""
from __future__ import annotations

import torch

from distill.metrics.digits import DigitsExtractor, load_digits_classifier
from distill.metrics.sources import TensorSource

#: the ``--ref`` value naming the built-in reference (a path of that name is not looked for)
SKLEARN_DIGITS = "sklearn-digits"


def load_digits_features(options: dict, device: torch.device) -> DigitsExtractor:
    """The extractor loader (``metrics.eval.EXTRACTORS['digits']``): the cached classifier (trained once,
    ~15 s on a CPU core, in ``$DISTILL_CACHE`` or ``~/.cache/distill``; ``options['digits_cache']`` overrides).
    Under ``torch.distributed`` the first process makes the cache file before the others read it."""
    import torch.distributed as dist

    cache = options.get("digits_cache")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # the first process trains and caches it; the others read that file (two writers of one .tmp file race)
        if dist.get_rank() == 0:
            load_digits_classifier(cache)
        dist.barrier()
    return DigitsExtractor(load_digits_classifier(cache)).to(device)


class _DigitsSource(TensorSource):
    def describe(self) -> str:
        return f"{SKLEARN_DIGITS} ({len(self)} images, 8x8, sklearn.datasets.load_digits)"


def digits_reference_source() -> TensorSource:
    """The 1,797 real digits as uint8 RGB ``[N, 3, 8, 8]`` (``[-1, 1]`` mapped to 0-255 and rounded)."""
    from distill.digits_data import load_digits_tensors

    images = load_digits_tensors()[0]
    return _DigitsSource.open(images, value_range=(-1.0, 1.0))
