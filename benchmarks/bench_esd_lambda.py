"""ESD's entropy weight lambda on the two-class toy with a sharpening teacher (CFG w = 3).

For each lambda the one-step student is trained with recipes/toy_cond_esd.yaml (lambda = 1 is DMD2) and
measured per class against the *unguided* class-conditional truth: within-mode spread (metrics.toy
``spread_ratio``: 1 = the truth's spread, true samples score ~0.95 because precision keeps 3-std points), energy
distance, and mode coverage (of the class's 4 modes). The guided teacher's own 50-step DDIM samples are in
the last row for reference. Expected: spread rises monotonically with lambda; lambda = 0 (SDS) collapses.

    python benchmarks/bench_esd_lambda.py [--lambdas 0 0.5 1 1.5] [recipe overrides ...]

Prints the table and writes benchmarks/results/esd_lambda.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from distill.samplers import sample_ddim
from distill.toy_eval import student_samples, train_toy
from distill.metrics.toy import mode_report

RECIPE = "recipes/toy_cond_esd.yaml"


def class_report(x, mixture, label: int, n: int):
    labels = torch.full((n,), label)
    truth = mixture.sample(n, class_labels=labels, generator=torch.Generator().manual_seed(7 + label))
    return mode_report(x, mixture, truth, class_labels=labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lambdas", nargs="*", type=float, default=[0.0, 0.5, 1.0, 1.5])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--out", default="benchmarks/results/esd_lambda.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    rows, run = [], None
    for lam in args.lambdas:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            run = train_toy(RECIPE, tmp, [f"method.entropy_weight={lam}", "train.sample_every=0"] + args.overrides)
        seconds = time.perf_counter() - start
        reports = [class_report(student_samples(run, args.n, label=c), run.models.mixture, c, args.n) for c in (0, 1)]
        rows.append({"lambda": lam, "spread_ratio": sum(r.spread_ratio for r in reports) / 2,
                     "energy": sum(r.energy for r in reports) / 2, "precision": sum(r.precision for r in reports) / 2,
                     "coverage": min(r.coverage for r in reports), "train_seconds": seconds,
                     "per_class": [r.as_dict() for r in reports]})
    # reference: the guided teacher (what lambda = 1 should match) and the truth itself
    models, w = run.models, float(run.config.method.get("guidance_scale", 1.0))
    for name in ("teacher DDIM-50 w", "truth"):
        reports = []
        for c in (0, 1):
            labels = torch.full((args.n,), c)
            g = torch.Generator().manual_seed(100 + c)
            if name == "truth":
                x = models.mixture.sample(args.n, class_labels=labels, generator=g)
            else:
                z = torch.randn(args.n, *models.sample_shape, generator=g)
                x = sample_ddim(models.teacher, z, models.conditioner(labels),
                                models.teacher.schedule.inference_timesteps(50, "trailing"), w)
            reports.append(class_report(x, models.mixture, c, args.n))
        rows.append({"lambda": name if name == "truth" else f"{name}={w:g}",
                     "spread_ratio": sum(r.spread_ratio for r in reports) / 2,
                     "energy": sum(r.energy for r in reports) / 2, "precision": sum(r.precision for r in reports) / 2,
                     "coverage": min(r.coverage for r in reports), "train_seconds": 0.0})
    print(f"{'lambda':>20} {'spread':>7} {'energy':>8} {'prec':>6} {'cover':>5} {'time s':>7}"
          "   (per class, against the unguided class-conditional truth; coverage of 4 modes)")
    for r in rows:
        print(f"{str(r['lambda']):>20} {r['spread_ratio']:>7.3f} {r['energy']:>8.4f} {r['precision']:>6.3f} "
              f"{r['coverage']:>5} {r['train_seconds']:>7.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
