"""Consistency distillation on the analytic ring8 teacher: the student at 1, 2 and 4 steps beside teacher DDIM.

Trains ``recipes/toy_ring8_lcm.yaml`` (its defaults, unless overridden), then samples 4000 points from the
student with LCMScheduler's timesteps for 1 / 2 / 4 steps (``[999]``, ``[999, 499]``,
``[999, 759, 499, 259]``) and from the exact teacher with deterministic DDIM over the same timesteps (plus the
50-step DDIM grid the student was distilled along, the best the student can reach), and compares each with
4000 true samples (:func:`metrics.toy.mode_report`: energy distance, precision, mode weights, spread).

    python benchmarks/bench_toy_consistency.py [--threads 1] [key=value recipe overrides ...]

Prints a table and writes ``benchmarks/results/toy_consistency.json``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from distill.build import build_run  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.engine import Trainer  # noqa: E402
from distill.samplers import sample_ddim, sample_student  # noqa: E402
from distill.metrics.toy import mode_report  # noqa: E402

#: LCMScheduler.set_timesteps(n) on the 50-step grid (the recipe's own 4-step schedule is added as well)
LCM_STEPS = {1: [999], 2: [999, 499], 4: [999, 759, 499, 259]}


def evaluate(samples: torch.Tensor, mixture, reference: torch.Tensor) -> dict:
    r = mode_report(samples, mixture, reference)
    return {"energy": r.energy, "precision": r.precision, "mode_weights": r.mode_weights,
            "max_weight_error": r.max_weight_error, "coverage": r.coverage, "spread_ratio": r.spread_ratio}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "toy_ring8_lcm.yaml"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for toy nets)")
    parser.add_argument("--n", type=int, default=4000, help="samples per row")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "toy_consistency.json"))
    parser.add_argument("overrides", nargs="*", help="recipe overrides key=value")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = load_config(args.recipe, args.overrides)
    models, method, data = build_run(config)
    mixture, schedule = models.mixture, models.teacher.schedule
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, run_dir,
                          progress=False)
        wall, cpu = time.time(), time.process_time()
        logs = trainer.run()
        wall, cpu = time.time() - wall, time.process_time() - cpu
    models.student.eval()

    reference = mixture.sample(args.n, generator=torch.Generator().manual_seed(7))
    rows = []
    truth = mixture.sample(args.n, generator=torch.Generator().manual_seed(8))
    rows.append({"model": "true samples", "steps": 0, **evaluate(truth, mixture, reference)})
    schedules = [(len(ts), [int(t) for t in ts], "LCMScheduler") for ts in LCM_STEPS.values()]
    own = [int(t) for t in models.student.timesteps]
    if own not in [ts for _, ts, _ in schedules]:
        schedules.append((len(own), own, "recipe"))
    for steps, timesteps, source in schedules:
        g = torch.Generator().manual_seed(123)
        z = torch.randn(args.n, *models.sample_shape, generator=g)
        x = sample_student(models.student, z, None, timesteps, generator=g)
        rows.append({"model": "consistency student", "steps": steps, "timesteps": timesteps, "source": source,
                     **evaluate(x, mixture, reference)})
        g = torch.Generator().manual_seed(123)
        z = torch.randn(args.n, *models.sample_shape, generator=g)
        x = sample_ddim(models.teacher, z, None, timesteps)
        rows.append({"model": "teacher DDIM", "steps": steps, "timesteps": timesteps, "source": source,
                     **evaluate(x, mixture, reference)})
    grid = method.grid.flip(0)
    g = torch.Generator().manual_seed(123)
    z = torch.randn(args.n, *models.sample_shape, generator=g)
    x = sample_ddim(models.teacher, z, None, grid, next_timesteps=(grid - method.skip).clamp_min(0))
    rows.append({"model": "teacher DDIM (distillation grid)", "steps": len(grid), **evaluate(x, mixture, reference)})

    print(f"ring8 consistency distillation: {config.train.steps} steps, batch {config.data.batch_size}, "
          f"train {wall:.1f} s wall / {cpu:.1f} s CPU on {args.threads} thread(s); final loss {logs.get('loss_cd', 0):.3g}")
    header = (f"{'model':32s} {'timesteps':24s} {'energy':>9s} {'precision':>9s} {'max|w-1/8|':>10s} {'spread':>6s}"
              "  mode weights")
    print(header)
    print("-" * len(header))
    for r in rows:
        weights = " ".join(f"{w:.3f}" for w in r["mode_weights"])
        times = "" if "timesteps" not in r else str(r["timesteps"]).replace(" ", "")
        if r.get("source") == "recipe":
            times += " *"
        elif r["model"].endswith("grid)"):
            times = f"{r['steps']} steps"
        print(f"{r['model']:32s} {times:24s} {r['energy']:9.5f} {r['precision']:9.3f} {r['max_weight_error']:10.3f} "
              f"{r['spread_ratio']:6.2f}  {weights}")
    print("* the recipe's student.timesteps; the others are LCMScheduler.set_timesteps(n)")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "toy_consistency", "recipe": str(Path(args.recipe).relative_to(ROOT))
              if Path(args.recipe).resolve().is_relative_to(ROOT) else args.recipe,
              "overrides": args.overrides, "train_steps": config.train.steps, "batch_size": config.data.batch_size,
              "train_wall_s": wall, "train_cpu_s": cpu, "threads": args.threads, "final_loss": logs.get("loss_cd"),
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "rows": rows}
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
