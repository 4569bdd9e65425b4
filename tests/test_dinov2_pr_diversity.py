"""FD-DINOv2, precision/recall and diversity against reference implementations on the same features.

References: torch-fidelity 0.4.0 (``metric_prc.calculate_precision_recall_full``, ``metric_fid``) and
dgm-eval's DINOv2 input pipeline (torchvision ``Resize((224, 224), BICUBIC)`` on PIL images, ``ToTensor``,
ImageNet ``Normalize``, the CLS token after the final norm), with a random-weight tiny ``Dinov2Model``.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from distill import metrics
from distill.metrics.dinov2 import DINOV2_ENV, build_tiny_dinov2, dinov2_input, load_dinov2
from distill.models.errors import ToolkitError

pytestmark = pytest.mark.usefixtures("torch_single_thread")
torch_fidelity = pytest.importorskip("torch_fidelity")  # a dev dependency (pyproject [dev])


@pytest.fixture(scope="module")
def tiny_dinov2_dir(tmp_path_factory):
    return build_tiny_dinov2(tmp_path_factory.mktemp("dinov2"), seed=0)


def _images(count: int, seed: int, size=(40, 52)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(count, 3, 5, 6, generator=g) * 255
    x = torch.nn.functional.interpolate(low, size, mode="bilinear") + torch.randn(count, 3, *size, generator=g) * 20
    return x.clamp(0, 255).round().to(torch.uint8)


def _dgm_eval_input(images: torch.Tensor) -> torch.Tensor:
    """dgm-eval's transform, image by image through PIL (its default: no clean resize)."""
    import torchvision.transforms as T

    transform = T.Compose([T.Resize((224, 224), T.InterpolationMode.BICUBIC), T.ToTensor(),
                           T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    return torch.stack([transform(Image.fromarray(im.permute(1, 2, 0).numpy())) for im in images])


def test_precision_recall_equal_torch_fidelity():
    from torch_fidelity.metric_prc import calculate_precision_recall_full

    g = torch.Generator().manual_seed(0)
    fake = torch.randn(300, 16, generator=g, dtype=torch.float64) * 0.8 + 0.4
    real = torch.randn(250, 16, generator=g, dtype=torch.float64)
    for k in (3, 5):
        ours = metrics.precision_recall(real, fake, k=k, block=64)
        precision, recall = calculate_precision_recall_full(fake, real, neighborhood=k)  # (generated, real)
        assert ours[0] == pytest.approx(precision, abs=1e-4)
        assert ours[1] == pytest.approx(recall, abs=1e-4)
        assert 0.05 < ours[0] < 0.95 and 0.05 < ours[1] < 0.95  # a non-trivial case
    collapsed = metrics.precision_recall(real, real[:1].repeat(50, 1) + 1e-3 * torch.randn(50, 16, generator=g,
                                         dtype=torch.float64))
    assert collapsed[0] == 1.0 and collapsed[1] < 0.05  # mode collapse: precise, no recall
    with pytest.raises(ToolkitError, match="more than 3 generated"):
        metrics.precision_recall(real, fake[:3])


def test_precision_recall_on_images_matches_features(tiny_dinov2_dir):
    extractor = load_dinov2(tiny_dinov2_dir)
    a, b = _images(12, seed=1), _images(10, seed=2)
    ours = metrics.precision_recall_images(a, b, extractor=extractor, batch_size=5, device="cpu", progress=False)
    precision, recall = metrics.precision_recall(extractor(b), extractor(a))
    assert ours == {"precision": precision, "recall": recall}
    with pytest.raises(ToolkitError, match="needs images, not statistics"):
        metrics.precision_recall_images(a, metrics.Stats(np.zeros(32), np.eye(32)), extractor=extractor)


def test_dinov2_input_matches_pil_within_one_grey_level():
    images = _images(3, seed=3)
    ours, ref = dinov2_input(images), _dgm_eval_input(images)
    grey_levels = ((ours - ref) * torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1) * 255).abs()
    assert grey_levels.max() <= 1.0 + 1e-4
    assert grey_levels.mean() < 0.05  # almost every pixel is identical


def test_fd_dinov2_equals_reference_on_the_same_features(tiny_dinov2_dir):
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    extractor = load_dinov2(tiny_dinov2_dir)
    assert extractor.feature_dim == 32 and len(extractor.weights_hash) == 64
    a, b = _images(40, seed=4), _images(36, seed=5, size=(64, 30))
    fd = metrics.fid(a, b, extractor=extractor, batch_size=16, device="cpu", progress=False)
    with torch.no_grad():
        feats = [extractor.model(pixel_values=dinov2_input(x)).pooler_output.double() for x in (a, b)]
        # the CLS token after the final layer norm, as dgm-eval's x_norm_clstoken
        hidden = extractor.model(pixel_values=dinov2_input(a)).last_hidden_state
    assert torch.allclose(extractor.model.layernorm(hidden)[:, 0].double(), feats[0], atol=1e-6) or \
        torch.allclose(hidden[:, 0].double(), feats[0], atol=1e-6)
    reference = fid_statistics_to_metric(*(fid_features_to_statistics(f) for f in feats), verbose=False)
    assert fd == pytest.approx(reference["frechet_inception_distance"], rel=1e-4, abs=1e-4)
    # dgm-eval's own PIL input gives (nearly) the same distance
    with torch.no_grad():
        pil = [extractor.model(pixel_values=_dgm_eval_input(x)).pooler_output.double() for x in (a, b)]
    pil_fd = fid_statistics_to_metric(*(fid_features_to_statistics(f) for f in pil), verbose=False)
    assert fd == pytest.approx(pil_fd["frechet_inception_distance"], rel=1e-2)
    stats = metrics.compute_stats(a, extractor=extractor, device="cpu", progress=False)
    assert "224x224" in stats.manifest["transform"] and stats.manifest["weights_sha256"] == extractor.weights_hash


def test_missing_dinov2_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(DINOV2_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(ToolkitError) as info:
        load_dinov2(tmp_path / "also-missing")
    message = str(info.value)
    assert "\n" not in message and "model.safetensors" in message and "--dinov2" in message and DINOV2_ENV in message
    assert str(tmp_path / "also-missing") in message and "facebook/dinov2-large" in message


def test_precision_recall_definition_on_a_line():
    """The digits metric's case (k = 1): radii 1 around 0..4; of the fakes only 0.5 lies inside."""
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0]])
    assert metrics.precision_recall(real, torch.tensor([[0.5], [10.0], [10.5], [11.0]]), k=1) == (0.25, 1.0)
    assert metrics.precision_recall(real, torch.tensor([[10.0], [10.5], [11.0], [11.5]]), k=1) == (0.0, 0.0)


def test_diversity_by_hand_and_collapse():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    groups = ["a", "a", "a", "b", "b", "c"]  # "c" has one image: skipped
    cos = torch.nn.functional.normalize(x, dim=1)
    expect_a = np.mean([1 - float(cos[i] @ cos[j]) for i in range(3) for j in range(3) if i != j])
    expect_b = 1 - float(cos[3] @ cos[4])
    assert metrics.diversity(x, groups) == pytest.approx((expect_a + expect_b) / 2, rel=1e-12)
    l2_a = np.mean([float((x[i] - x[j]).norm()) for i in range(3) for j in range(3) if i != j])
    assert metrics.diversity(x, groups, distance="l2") == pytest.approx((l2_a + float((x[3] - x[4]).norm())) / 2)
    assert metrics.diversity(x[:1].repeat(4, 1) * 3, [0, 0, 1, 1]) == pytest.approx(0, abs=1e-12)  # collapse
    with pytest.raises(ToolkitError, match="at least 2 images of one prompt"):
        metrics.diversity(x[:3], [0, 1, 2])
