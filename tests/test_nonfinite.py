"""No silent wrong numbers: non-finite images, latents, features and statistics, and bad numeric options.

Each case must end in a one-line ``error:`` (exit 2) on the command line, or a ToolkitError in Python,
with the number of samples affected, and before any network loads where the input can be checked
up front (the loaders are replaced by functions that fail the test if called).
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from distill import metrics
from distill.metrics.finite import nonfinite_rows
from distill.metrics.sources import GeneratorSource
from distill.models.errors import ToolkitError
from distill.sample_grids import decode_to_images
from tests.test_fid import random_extractor
from tests.test_metrics_cli import assert_one_line_error, offline, run, write_images  # noqa: F401 - fixture

pytestmark = pytest.mark.usefixtures("torch_single_thread")
fid_module = importlib.import_module("distill.metrics.fid")
clip_module = importlib.import_module("distill.metrics.clip_score")


@pytest.fixture
def no_network(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a network was loaded before the inputs were checked")

    monkeypatch.setattr(fid_module, "load_inception", fail)
    monkeypatch.setattr(clip_module, "load_clip", fail)


def _images_with_nan(count: int = 5, bad=(1, 3)) -> torch.Tensor:
    x = torch.rand(count, 3, 16, 16) * 2 - 1
    for i in bad:
        x[i, 0, 2, 2] = float("nan") if i % 2 else float("inf")
    return x


def test_nonfinite_rows_counts_samples():
    assert nonfinite_rows(_images_with_nan()) == 2
    assert nonfinite_rows(torch.zeros(4, 3, dtype=torch.uint8)) == 0
    assert nonfinite_rows(np.array([1.0, np.nan, np.inf])) == 2


def test_float_images_with_nan_are_refused_before_the_network(no_network):
    images = _images_with_nan()
    for call in (lambda: metrics.fid(images, images, value_range=(-1, 1)),
                 lambda: metrics.compute_stats(images, value_range=(-1, 1)),
                 lambda: metrics.kid(images, images, value_range=(-1, 1)),
                 lambda: metrics.clip_score(images, ["a"] * 5, value_range=(-1, 1))):
        with pytest.raises(ToolkitError, match="2 of 5 images contain NaN or inf"):
            call()


def test_generator_with_nan_names_the_count():
    def generate(n):
        x = torch.zeros(n, 3, 8, 8)
        x[: n // 2] = float("nan")
        return x

    source = GeneratorSource.open(generate, 8, value_range=(-1, 1))
    with pytest.raises(ToolkitError, match=r"2 of 4 generated images .* contain NaN or inf"):
        metrics.compute_stats(source, extractor=random_extractor(), batch_size=4, device="cpu", progress=False)


def test_extractor_giving_nan_is_an_error():
    class Broken(torch.nn.Module):
        def forward(self, x):
            out = x.mean(dim=(2, 3))
            out[0] = float("nan")
            return out

    images = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ToolkitError, match="1 of 4 feature vectors contain NaN"):
        metrics.compute_stats(images, extractor=Broken(), device="cpu", progress=False)
    with pytest.raises(ToolkitError, match="1 of 3 feature vectors"):
        metrics.kernel_distance(torch.tensor([[0.0, 1], [1, float("nan")], [2, 2]]), torch.ones(3, 2))


def test_statistics_with_nan(tmp_path, no_network):
    sigma = np.eye(2048)
    sigma[3, 4] = sigma[4, 3] = np.nan
    np.savez(tmp_path / "nan.npz", mu=np.zeros(2048), sigma=sigma)
    np.savez(tmp_path / "ok.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(ToolkitError, match="0 of 2048 mean entries and 2 of 4194304 covariance entries"):
        metrics.Stats.load(tmp_path / "nan.npz")
    with pytest.raises(ToolkitError, match="1 of 3 mean entries"):
        metrics.frechet_distance(np.array([0, np.inf, 0]), np.eye(3), np.zeros(3), np.eye(3))
    good = write_images(tmp_path / "good", 3, seed=0)
    with pytest.raises(ToolkitError, match="covariance entries are NaN"):
        metrics.fid(good, tmp_path / "nan.npz")


def test_cli_statistics_with_nan_is_one_line(offline, capsys):
    np.savez(offline / "nan.npz", mu=np.full(2048, np.nan), sigma=np.eye(2048))
    np.savez(offline / "ok.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    code, _, err = run(["fid", offline / "ok.npz", offline / "nan.npz"], capsys)
    assert_one_line_error(code, err, "nan.npz", "2048 of 2048 mean entries")


# fragments name the option and its value only: engineer "robust" words the same check differently
@pytest.mark.parametrize("argv, fragment", [
    (["fid", "{good}", "{good}", "--batch-size", "0"], "--batch-size"),
    (["fid", "{good}", "{good}", "--workers", "-1"], "--workers"),
    (["fid-stats", "{good}", "--out", "{tmp}/s.npz", "--batch-size", "-3"], "--batch-size"),
    (["clip", "{good}", "{tmp}/p.txt", "--batch-size", "0"], "--batch-size"),
    (["clip", "{good}", "{tmp}/p.txt", "--workers", "-2"], "--workers"),
])
def test_cli_numeric_options_fail_before_any_network(argv, fragment, offline, capsys, no_network):
    good = write_images(offline / "good", 3, seed=0)
    (offline / "p.txt").write_text("a\nb\nc\n")
    code, _, err = run([a.format(good=good, tmp=offline) for a in argv], capsys)
    assert_one_line_error(code, err, fragment)


def test_api_numeric_options(no_network):
    images = torch.zeros(4, 3, 8, 8, dtype=torch.uint8)
    for call, name in ((lambda: metrics.fid(images, images, batch_size=0), "batch_size"),
                       (lambda: metrics.compute_stats(images, num_workers=-1), "num_workers"),
                       (lambda: metrics.kid(images, images, num_subsets=0), "num_subsets"),
                       (lambda: metrics.kid(images, images, max_subset_size=1), "max_subset_size"),
                       (lambda: metrics.compute_stats(lambda n: images[:n], num_samples=0), "num_samples"),
                       (lambda: metrics.clip_score(images, ["a"] * 4, batch_size=0), "batch_size"),
                       (lambda: metrics.fid(images, images, batch_size=2.5), "batch_size")):
        with pytest.raises(ToolkitError, match=name):
            call()


class _StubVAE:
    """Stands in for a diffusers VAE: ``decode`` gives ``out`` (or fails the test when ``out`` is None)."""

    device, dtype = torch.device("cpu"), torch.float32
    config = SimpleNamespace(scaling_factor=0.5)

    def __init__(self, out=None):
        self.out = out

    def decode(self, latents):
        if self.out is None:
            raise AssertionError("NaN latents reached the VAE")
        return SimpleNamespace(sample=self.out)


def test_nan_latents_are_an_error_with_the_count():
    latents = torch.randn(6, 4, 8, 8)
    latents[[0, 2, 5], 1, 0, 0] = float("nan")
    models = SimpleNamespace(pipeline=SimpleNamespace(vae=_StubVAE()))
    with pytest.raises(ToolkitError, match="3 of 6 latents contain NaN or inf"):
        decode_to_images(latents, models)
    decoded = torch.zeros(6, 3, 16, 16)
    decoded[4] = float("inf")
    models = SimpleNamespace(pipeline=SimpleNamespace(vae=_StubVAE(decoded)))
    with pytest.raises(ToolkitError, match="1 of 6 decoded images contain NaN or inf"):
        decode_to_images(torch.randn(6, 4, 8, 8), models)
    ok = decode_to_images(torch.randn(6, 4, 8, 8), SimpleNamespace(pipeline=SimpleNamespace(vae=_StubVAE(torch.zeros(6, 3, 16, 16)))))
    assert ok.shape == (6, 3, 16, 16) and torch.all(ok == 0.5)
