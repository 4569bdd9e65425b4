"""FID against the reference implementations: clean-fid 0.1.35 (Parmar et al. 2022) and scipy's sqrtm.

No Inception weights are available offline, so both pipelines are handed the same random-weight
network; what is compared is everything around it (reading, resizing, statistics, distance).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn

from distill import metrics
from distill.metrics.sources import GeneratorSource, TensorSource, to_uint8
from distill.metrics.stats import RunningStats, Stats
from distill.models.errors import ToolkitError

fid_module = importlib.import_module("distill.metrics.fid")
inception_module = importlib.import_module("distill.metrics.inception")

# Correctness tests: one intra-op thread (conftest); on a small shared machine two threads per
# process oversubscribe the cores and make LAPACK and small resizes many times slower.
pytestmark = pytest.mark.usefixtures("torch_single_thread")

SIZES = [(32, 32), (64, 48), (299, 299), (320, 256), (17, 90), (128, 128)]


def random_extractor(dim: int = 16, seed: int = 0) -> nn.Module:
    """A small random-weight conv net mapping [N, 3, 299, 299] in 0-255 to [N, dim] features."""
    generator = torch.Generator().manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 7, stride=4),
        nn.Tanh(),
        nn.Conv2d(8, dim, 5, stride=4),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    return net.eval()


def write_images(folder: Path, count: int, seed: int, shift: float = 0.0, exts=("png",), sizes=SIZES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = sizes[i % len(sizes)]
        base = rng.normal(110 + shift, 50, (1, 1, 3)) + rng.normal(0, 40, (h, w, 3))
        image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
        ext = exts[i % len(exts)]
        sub = folder / "sub" if i % 5 == 0 else folder  # recursive listing
        sub.mkdir(exist_ok=True)
        image.save(sub / f"{i:04d}.{ext}", **({"quality": 95} if ext == "jpg" else {}))
    return folder


def test_clean_resize_matches_cleanfid_pil_resizer():
    from cleanfid.resize import make_resizer

    resizer = make_resizer("PIL", False, "bicubic", (299, 299))
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (17, 90), (299, 299), (320, 256), (512, 384), (1, 7)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        ours = metrics.clean_resize(torch.from_numpy(image).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        assert ours.dtype == np.float64
        np.testing.assert_allclose(ours, resizer(image), rtol=0, atol=1e-3)


def test_fid_matches_cleanfid_on_folders(tmp_path):
    import cleanfid.fid

    a = write_images(tmp_path / "a", 100, seed=1, exts=("png", "jpg", "webp"))
    b = write_images(tmp_path / "b", 100, seed=2, shift=25.0, exts=("png", "webp"))
    net = random_extractor()
    ours = metrics.fid(a, b, extractor=net, device="cpu", num_workers=0, batch_size=16, progress=False)
    reference = cleanfid.fid.compute_fid(
        str(a), str(b), mode="clean", custom_feat_extractor=net, device=torch.device("cpu"), num_workers=0, verbose=False
    )
    assert ours > 1e-3
    assert abs(ours - reference) <= 1e-4 * abs(reference), (ours, reference)


# The scipy reference runs in its own process with one BLAS thread: on a small shared machine,
# multi-threaded OpenBLAS under oversubscription is up to 10x slower (spinning threads).
SQRTM_REFERENCE = """
import sys, numpy as np
from cleanfid.fid import frechet_distance
rng = np.random.default_rng(0)
d, n = 1024, 2500
mixing = rng.standard_normal((d, d)) / np.sqrt(d)
x = rng.standard_normal((n, d)) @ mixing
y = rng.standard_normal((n, d)) @ (mixing + 0.2 * rng.standard_normal((d, d)) / np.sqrt(d)) + 0.05
mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
reference = float(np.real(frechet_distance(mu1, s1, mu2, s2)))
np.savez(sys.argv[1], mu1=mu1, s1=s1, mu2=mu2, s2=s2, reference=reference)
"""


def test_frechet_distance_matches_scipy_sqrtm(tmp_path):
    """1024-d statistics of 2500 samples (Inception's 2048-d at the same samples-per-dimension ratio, 8x cheaper in
    scipy's ``sqrtm``): ours (eigh) against clean-fid's scipy ``sqrtm`` formula."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    subprocess.run([sys.executable, "-c", SQRTM_REFERENCE, str(tmp_path / "ref.npz")], env=env, check=True, timeout=600)
    data = np.load(tmp_path / "ref.npz")
    mu1, s1, mu2, s2, reference = (data[k] for k in ("mu1", "s1", "mu2", "s2", "reference"))
    ours = metrics.frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - reference) <= 1e-6 * abs(reference), (ours, float(reference))
    assert metrics.frechet_distance(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2))) == pytest.approx(ours, rel=1e-12)
    assert metrics.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-6)


def test_fewer_samples_than_dims_warns():
    images = torch.randint(0, 256, (10, 3, 40, 40), dtype=torch.uint8)
    with pytest.warns(UserWarning, match="rank-deficient"):
        stats = metrics.compute_stats(images, extractor=random_extractor(dim=32), device="cpu", progress=False)
    assert stats.n == 10 and stats.dim == 32


def test_running_stats_equal_numpy_float64():
    rng = np.random.default_rng(0)
    features = rng.normal(3.0, 2.0, (1000, 40))
    running = RunningStats()
    for chunk in np.array_split(features, 7):
        running.update(torch.from_numpy(chunk).float())
    stats = running.finalize()
    features32 = features.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(stats.mu, features32.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.sigma, np.cov(features32, rowvar=False), rtol=0, atol=1e-10)


def test_stats_npz_roundtrip_manifest_and_dimension_check(tmp_path):
    images = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)
    stats = metrics.compute_stats(images, extractor=random_extractor(dim=8), device="cpu", progress=False)
    path = stats.save(tmp_path / "ref.npz")
    loaded = Stats.load(path)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.n == 40
    manifest = loaded.manifest
    assert manifest["count"] == 40 and manifest["feature_dim"] == 8
    assert manifest["source"].startswith("tensor") and "bicubic" in manifest["transform"]
    assert manifest["weights_sha256"] == fid_module.module_sha256(random_extractor(dim=8))
    with pytest.raises(ToolkitError, match="8-d statistics"):
        Stats.load(path, expected_dim=2048)
    # clean-fid's own files hold only mu and sigma
    np.savez(tmp_path / "cleanfid.npz", mu=stats.mu, sigma=stats.sigma)
    plain = Stats.load(tmp_path / "cleanfid.npz")
    assert plain.n is None and plain.manifest == {}
    assert metrics.fid(path, tmp_path / "cleanfid.npz", extractor=random_extractor(dim=8)) == pytest.approx(0, abs=1e-9)
    assert metrics.fid(path, path) == pytest.approx(0, abs=1e-9)  # two statistics: no extractor involved
    with pytest.raises(ToolkitError, match="8-d statistics but Inception has 2048-d"):
        metrics.fid(images, path)  # default extractor: Inception, checked before it loads


def test_in_memory_sources_agree_with_folder(tmp_path):
    """A folder, a uint8 tensor, a float tensor in [-1, 1] and a generator callable give one result."""
    sizes = [(48, 40)]
    folder = write_images(tmp_path / "imgs", 24, seed=3, sizes=sizes)
    files = sorted(folder.rglob("*.png"))
    uint8 = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])
    as_float = uint8.double() / 127.5 - 1  # exact inverse of the rounding below
    net = random_extractor(dim=8)
    kw = dict(extractor=net, device="cpu", progress=False, batch_size=5)
    from_folder = metrics.compute_stats(folder, num_workers=0, **kw)
    resized_in_workers = metrics.compute_stats(folder, num_workers=2, **kw)  # CPU: workers resize too
    from_uint8 = metrics.compute_stats(uint8, **kw)
    from_float = metrics.compute_stats(as_float, value_range=(-1, 1), **kw)
    cursor = iter(range(0, len(uint8), 1))

    def generate(batch_size: int) -> torch.Tensor:
        start = next(cursor)
        for _ in range(batch_size - 1):
            next(cursor)
        return as_float[start : start + batch_size].float()

    from_gen = metrics.compute_stats(generate, num_samples=len(uint8), value_range=(-1, 1), **kw)
    for other in (resized_in_workers, from_uint8, from_float, from_gen):
        np.testing.assert_allclose(other.mu, from_folder.mu, rtol=0, atol=1e-10)
        np.testing.assert_allclose(other.sigma, from_folder.sigma, rtol=0, atol=1e-10)
        assert other.n == 24
    # NHWC arrays are recognised; grey repeats to RGB, alpha is dropped
    np.testing.assert_allclose(metrics.compute_stats(uint8.permute(0, 2, 3, 1).numpy(), **kw).mu, from_folder.mu, atol=1e-10)
    rgba = torch.cat([uint8, torch.full_like(uint8[:, :1], 7)], dim=1)
    np.testing.assert_allclose(metrics.compute_stats(rgba, **kw).mu, from_folder.mu, atol=1e-10)


def test_quantisation_round_and_truncate():
    x = torch.tensor([-1.0, -0.999, 0.0, 0.5, 1.0, 1.5])
    assert to_uint8(x, (-1, 1)).tolist() == [0, 0, 128, 191, 255, 255]  # 127.5 rounds to even 128
    assert to_uint8(x, (-1, 1), truncate=True).tolist() == [0, 0, 127, 191, 255, 255]
    assert to_uint8(torch.tensor([0.0, 1.0]), (0, 1)).tolist() == [0, 255]
    levels = torch.arange(256, dtype=torch.uint8)
    for dtype in (torch.float16, torch.bfloat16):  # half-precision generator outputs keep every level
        assert torch.equal(to_uint8((levels.float() / 127.5 - 1).to(dtype), (-1, 1)), levels)


def test_source_validation_errors():
    with pytest.raises(ToolkitError, match="value_range"):
        TensorSource.open(torch.rand(4, 3, 8, 8))
    with pytest.raises(ToolkitError, match="at least 2"):
        TensorSource.open(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ToolkitError, match="channels"):
        TensorSource.open(torch.zeros(4, 5, 8, 8, dtype=torch.uint8))
    with pytest.raises(ToolkitError, match="num_samples"):
        GeneratorSource.open(lambda n: None, None)
    bad_count = GeneratorSource.open(lambda n: torch.zeros(n + 1, 3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ToolkitError, match="asked for"):
        metrics.compute_stats(bad_count, extractor=random_extractor(), device="cpu", progress=False)
    with pytest.warns(UserWarning, match="value_range"):
        metrics.compute_stats(torch.full((4, 3, 8, 8), 200.0), value_range=(0, 1), extractor=random_extractor(dim=2),
                              device="cpu", progress=False)


def test_validation_happens_before_the_network_loads(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was loaded before the inputs were checked")

    monkeypatch.setattr(fid_module, "load_inception", no_network)
    good = write_images(tmp_path / "good", 3, seed=0)
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(ToolkitError):
            metrics.fid(good, bad)
    np.savez(tmp_path / "small.npz", mu=np.zeros(4), sigma=np.eye(4))
    with pytest.raises(ToolkitError, match="4-d statistics but Inception"):
        metrics.fid(good, tmp_path / "small.npz")


def test_missing_inception_weights_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv(inception_module.INCEPTION_ENV, str(tmp_path / "nowhere" / "inception.pt"))
    monkeypatch.setattr(inception_module, "cleanfid_cache_dirs", lambda: [tmp_path / "cleanfid-cache"])
    with pytest.raises(ToolkitError) as caught:
        metrics.load_inception()
    message = str(caught.value)
    assert "\n" not in message
    assert inception_module.INCEPTION_FILENAME in message and inception_module.INCEPTION_URL in message
    assert str(tmp_path / "nowhere" / "inception.pt") in message and str(tmp_path / "cleanfid-cache") in message


def test_inception_path_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setattr(inception_module, "cleanfid_cache_dirs", lambda: [tmp_path / "cache"])
    (tmp_path / "cache").mkdir()
    cached = tmp_path / "cache" / inception_module.INCEPTION_FILENAME
    cached.write_bytes(b"x")
    monkeypatch.delenv(inception_module.INCEPTION_ENV, raising=False)
    assert metrics.find_inception_weights() == cached
    explicit = tmp_path / "mine"
    explicit.mkdir()
    (explicit / inception_module.INCEPTION_FILENAME).write_bytes(b"y")
    monkeypatch.setenv(inception_module.INCEPTION_ENV, str(explicit))
    assert metrics.find_inception_weights() == explicit / inception_module.INCEPTION_FILENAME
    with pytest.raises(ToolkitError, match="cannot load Inception weights"):
        metrics.load_inception(explicit)  # not a TorchScript file


def _two_process_worker(rank: int, world_size: int, init_file: str, folder: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        stats = metrics.compute_stats(folder, extractor=random_extractor(), device="cpu", num_workers=0,
                                      batch_size=8, progress=False)
        if rank == 0:
            stats.save(out)
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_same_statistics_as_one(tmp_path):
    folder = write_images(tmp_path / "imgs", 41, seed=4)
    out = tmp_path / "two.npz"
    mp.spawn(_two_process_worker, args=(2, str(tmp_path / "init"), str(folder), str(out)), nprocs=2, join=True)
    two = Stats.load(out)
    one = metrics.compute_stats(folder, extractor=random_extractor(), device="cpu", num_workers=0, progress=False)
    assert two.n == one.n == 41 and two.manifest["processes"] == 2
    np.testing.assert_allclose(two.mu, one.mu, rtol=0, atol=1e-10)
    np.testing.assert_allclose(two.sigma, one.sigma, rtol=0, atol=1e-10)
