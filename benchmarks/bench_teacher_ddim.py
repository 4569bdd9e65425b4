"""Energy distance of the analytic ring8 teacher sampled with DDIM at 1-50 steps, beside the two-sample floor.

The floor is the energy distance between two independent sets of true samples of the same size (averaged
over seeds); a sampler that reproduces the distribution sits at the floor. Run:

    python benchmarks/bench_teacher_ddim.py [--n 4000] [--seeds 5]

Prints a table and writes benchmarks/results/teacher_ddim.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from distill.samplers import sample_ddim
from distill.metrics.toy import energy_distance, mode_report
from distill.models.analytic import build_mixture, mixture_denoiser
from distill.models.roles import Teacher
from distill.models.schedules import VPSchedule


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10, 50])
    parser.add_argument("--out", default="benchmarks/results/teacher_ddim.json")
    args = parser.parse_args()

    mixture = build_mixture("ring8")
    schedule = VPSchedule(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    teacher = Teacher(mixture_denoiser(mixture, schedule))
    floors, rows = [], {k: [] for k in args.steps}
    precisions = {k: [] for k in args.steps}
    for seed in range(args.seeds):
        g = torch.Generator().manual_seed(seed)
        ref, other = mixture.sample(args.n, generator=g), mixture.sample(args.n, generator=g)
        floors.append(energy_distance(other, ref))
        for k in args.steps:
            x = sample_ddim(teacher, torch.randn(args.n, 2, generator=g), None,
                            schedule.inference_timesteps(k, "trailing"))
            rows[k].append(energy_distance(x, ref))
            precisions[k].append(mode_report(x, mixture, ref).precision)
    floor = statistics.mean(floors)
    print(f"ring8 teacher, DDIM (trailing timesteps), {args.n} samples, mean over {args.seeds} seeds")
    print(f"{'steps':>6} {'energy':>10} {'x floor':>8} {'precision':>10}")
    result = {"floor": floor, "n": args.n, "seeds": args.seeds, "ddim": {}}
    for k in args.steps:
        e = statistics.mean(rows[k])
        p = statistics.mean(precisions[k])
        result["ddim"][k] = {"energy": e, "ratio_to_floor": e / floor, "precision": p}
        print(f"{k:>6} {e:>10.5f} {e / floor:>8.2f} {p:>10.3f}")
    print(f"{'floor':>6} {floor:>10.5f} {1.0:>8.2f}   (two independent true sets)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
