"""FID feature-pipeline throughput: this toolkit's in-memory and folder paths against clean-fid's.

Same images, same random-weight feature extractor, same batch size, for every path:

- ``ours gen``: ``metrics.compute_stats(fn, num_samples=N)`` with ``fn(batch) -> uint8 images``
  (quantise, resize on the device in float64, extractor, float64 running statistics);
- ``ours folder``: ``metrics.compute_stats(folder)`` on the same images written as PNGs;
- ``clean-fid gen``: ``cleanfid.fid.get_model_features(G, ...)`` (the ``compute_fid(gen=...)`` path),
  then ``np.mean``/``np.cov`` as clean-fid does;
- ``clean-fid folder``: ``cleanfid.fid.get_folder_features(folder, ...)``, then mean/cov.

Image generation costs nothing here (the images are made beforehand), so the table measures the
evaluation pipeline, not a generator. Paths run round robin, best of ``--repeats``, so that load
from other processes on the machine hits them alike; the load average is saved with the results. With the default ``small`` extractor the network is cheap and
the pipeline (decode, resize, transfers, statistics) dominates; ``--extractor inception-arch`` uses
torchvision's InceptionV3 architecture with random weights (2048-d) to show the end-to-end cost
when the network dominates, as it does on a CPU.

    python benchmarks/bench_fid_throughput.py                 # default, under ~2 minutes on 2 CPU cores
    python benchmarks/bench_fid_throughput.py --num 2048 --sizes 64 256 512 --device cuda

Each path's FID against the same reference statistics (another image set) is recorded with its
relative difference to ``ours gen`` (the target is equal values to 1e-4), and the GPU's name.

Writes ``benchmarks/results/fid_throughput.json`` (git-ignored).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from distill import metrics  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "fid_throughput.json"


def small_extractor(dim: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 8, stride=8), nn.ReLU(), nn.Conv2d(16, dim, 4, stride=4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ).eval()


def inception_arch_extractor() -> nn.Module:
    """torchvision's InceptionV3 (random weights), pool features 2048-d, input 0-255 like clean-fid's."""
    from torchvision.models import inception_v3

    torch.manual_seed(0)
    net = inception_v3(weights=None, aux_logits=False, init_weights=False, transform_input=False)
    net.fc = nn.Identity()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net.eval()

        def forward(self, x):
            return self.net((x - 128) / 128)

    return Wrapped().eval()


def make_images(num: int, size: int, seed: int = 0) -> torch.Tensor:
    """Smooth random uint8 images [N, 3, size, size] (PNG-compressible, unlike white noise)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(num, 3, max(size // 8, 2), max(size // 8, 2), generator=g) * 255
    images = torch.nn.functional.interpolate(low, (size, size), mode="bilinear", align_corners=False)
    images = images + torch.randn(images.shape, generator=g) * 10
    return images.clamp(0, 255).round().to(torch.uint8)


class Replay:
    """A "generator" that hands out the prepared images in order, for both toolkits."""

    def __init__(self, images: torch.Tensor):
        self.images = images
        self.cursor = 0

    def take(self, count: int) -> torch.Tensor:
        batch = self.images[self.cursor : self.cursor + count]
        if batch.shape[0] < count:  # clean-fid rounds the last batch up to a full batch
            batch = torch.cat([batch, self.images[: count - batch.shape[0]]])
        self.cursor = (self.cursor + count) % len(self.images)
        return batch


def timed(fn) -> tuple[float, tuple[np.ndarray, np.ndarray]]:
    start = time.perf_counter()
    mu, sigma = fn()
    return time.perf_counter() - start, (mu, sigma)


def run_size(size: int, args, extractor: nn.Module, device: torch.device, workdir: Path) -> list[dict]:
    import cleanfid.fid as cleanfid

    images = make_images(args.num, size)
    folder = workdir / f"png_{size}"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.png")
    extractor = extractor.to(device)
    kw = dict(extractor=extractor, device=device, batch_size=args.batch_size, progress=False)

    def ours_gen():
        replay = Replay(images)
        stats = metrics.compute_stats(replay.take, num_samples=args.num, **kw)
        return stats.mu, stats.sigma

    def ours_folder():
        stats = metrics.compute_stats(folder, num_workers=args.workers, **kw)
        return stats.mu, stats.sigma

    def cleanfid_gen():
        replay = Replay(images)
        feats = cleanfid.get_model_features(
            lambda z: replay.take(z.shape[0]), extractor, mode="clean", z_dim=8, num_gen=args.num,
            batch_size=args.batch_size, device=device, verbose=False,
        )
        return np.mean(feats, axis=0), np.cov(feats, rowvar=False)

    def cleanfid_folder():
        feats = cleanfid.get_folder_features(
            str(folder), extractor, num_workers=args.workers, batch_size=args.batch_size, device=device,
            mode="clean", verbose=False,
        )
        return np.mean(feats, axis=0), np.cov(feats, rowvar=False)

    paths = {"ours gen": ours_gen, "ours folder": ours_folder, "clean-fid gen": cleanfid_gen, "clean-fid folder": cleanfid_folder}
    timings = {name: [] for name in paths}
    means, fids = {}, {}
    # the value check: every path's FID against the same reference (another image set, ours gen)
    ref = metrics.compute_stats(Replay(make_images(args.num, size, seed=1)).take, num_samples=args.num, **kw)
    for _ in range(args.repeats):  # round robin, best of: fair when other load on the machine comes and goes
        for name, fn in paths.items():
            elapsed, (means[name], sigma) = timed(fn)
            fids[name] = metrics.frechet_distance(means[name], sigma, ref.mu, ref.sigma)
            timings[name].append(elapsed)
    rows = []
    for name in paths:
        seconds = min(timings[name])
        rows.append(
            {
                "size": size,
                "path": name,
                "images": args.num,
                "seconds": round(seconds, 3),
                "seconds_all_runs": [round(t, 3) for t in timings[name]],
                "images_per_s": round(args.num / seconds, 1),
                "max_abs_mu_diff_vs_ours_gen": float(np.abs(means[name] - means["ours gen"]).max()),
                "fid_vs_reference": fids[name],
                "fid_rel_diff_vs_ours_gen": abs(fids[name] - fids["ours gen"]) / max(abs(fids["ours gen"]), 1e-12),
            }
        )
        print(f"  {size:>4}px  {name:<17} {args.num / seconds:8.1f} img/s", flush=True)
    ours = rows[0]["images_per_s"]
    for row in rows:
        row["ours_gen_speedup"] = round(ours / row["images_per_s"], 2)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=256, help="images per path (default 256)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256], help="image sizes (default 64 256)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="folder decoding workers")
    parser.add_argument("--extractor", choices=["small", "inception-arch"], default="small")
    parser.add_argument("--device", default=None, help="default: CUDA when present, else CPU")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per path (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda but torch sees no CUDA device on this machine")
    extractor = small_extractor() if args.extractor == "small" else inception_arch_extractor()
    print(f"device {device}, torch threads {torch.get_num_threads()}, extractor {args.extractor}, {args.num} images per path")
    with torch.no_grad():  # warm-up: first-call allocations and kernel selection, not timed
        metrics.extract_features(make_images(2, 64), extractor.to(device), device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            rows += run_size(size, args, extractor, device, Path(tmp))

    print(f"\n| size | path | img/s | ours gen speed-up | max abs mu diff vs ours gen | FID rel. diff vs ours gen |"
          f"\n|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['size']} | {row['path']} | {row['images_per_s']:.1f} | {row['ours_gen_speedup']:.2f}x "
            f"| {row['max_abs_mu_diff_vs_ours_gen']:.1e} | {row['fid_rel_diff_vs_ours_gen']:.1e} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "device": str(device),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
