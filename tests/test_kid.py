"""KID against clean-fid 0.1.35's estimator (``kernel_distance``, ``compute_kid``), with a random-weight extractor."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from distill import metrics
from distill.models.errors import ToolkitError
from tests.test_fid import random_extractor, write_images

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def test_kernel_distance_matches_cleanfid():
    from cleanfid.fid import kernel_distance as reference

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 64))
    b = rng.standard_normal((300, 64)) * 1.2 + 0.3
    # one subset holding every sample: the value no longer depends on the random draw
    ours = metrics.kernel_distance(a, b, num_subsets=1, max_subset_size=300)
    ref = reference(a, b, num_subsets=1, max_subset_size=300)
    assert ref > 1e-3
    assert abs(ours - ref) <= 1e-9 * abs(ref), (ours, ref)
    # subsets: the same estimator; with 50 subsets of 150 the two random draws agree to a few percent
    np.random.seed(0)
    sub_ref = reference(a, b, num_subsets=50, max_subset_size=150)
    assert abs(metrics.kernel_distance(a, b, num_subsets=50, max_subset_size=150) - sub_ref) < 0.1 * ref
    # unbiased: two samples of one distribution give ~0 (and may be negative)
    same = metrics.kernel_distance(a[:150], a[150:], num_subsets=1, max_subset_size=150)
    assert abs(same) < 0.1 * ref


def test_kid_on_folders_matches_cleanfid(tmp_path):
    """compute_kid = get_folder_features on both folders + kernel_distance; clean-fid's compute_kid builds its own
    Inception, so its two parts are called with the shared random extractor."""
    import cleanfid.fid

    a = write_images(tmp_path / "a", 40, seed=1)
    b = write_images(tmp_path / "b", 40, seed=2, shift=25.0)
    net = random_extractor()
    ours = metrics.kid(a, b, extractor=net, device="cpu", num_workers=0, batch_size=16, progress=False,
                       num_subsets=1, max_subset_size=1000)
    feats = [cleanfid.fid.get_folder_features(str(f), net, num_workers=0, batch_size=16, device=torch.device("cpu"),
                                              mode="clean", verbose=False) for f in (a, b)]
    ref = cleanfid.fid.kernel_distance(feats[0], feats[1], num_subsets=1, max_subset_size=1000)
    assert abs(ref) > 1e-4  # (KID is unbiased: with 40 images and a random network it may come out negative)
    assert abs(ours - ref) <= 1e-4 * abs(ref), (ours, ref)


def test_kid_refuses_statistics(tmp_path):
    a = write_images(tmp_path / "a", 4, seed=1)
    stats = metrics.compute_stats(a, extractor=random_extractor(), device="cpu", num_workers=0, progress=False)
    stats.save(tmp_path / "a.npz")
    with pytest.raises(ToolkitError, match="KID needs images"):
        metrics.kid(a, tmp_path / "a.npz", extractor=random_extractor(), device="cpu", progress=False)
