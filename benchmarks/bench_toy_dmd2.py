"""DMD2 on analytic teachers with the recipes' defaults: quality against the truth, and training time.

Rows: ring8 one step (with the two ablations: warm start only, DMD2 without warm start), ring8 four steps (backward simulation; also evaluated at 1 and 2 of its steps),
explicit teachers (5 unequal modes in 2-D, 4 modes in 3-D) and the two-class CFG recipe (against the
teacher's guided DDIM samples). Targets (issue): energy <= 0.005, precision >= 0.95, every mode weight
within 0.03, trained in at most 2 minutes on 2 CPU cores.

    python benchmarks/bench_toy_dmd2.py [--only ring8 ...]

Prints a table and writes benchmarks/results/toy_dmd2.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from distill.toy_eval import evaluate, train_toy

EXPLICIT_5 = ["teacher.preset=null", "teacher.means=[[1.5,0],[0,1.5],[-1.5,0],[0,-1.5],[0,0]]",
              "teacher.stds=[0.1,0.15,0.1,0.2,0.1]", "teacher.weights=[1,2,3,1,1]"]
EXPLICIT_3D = ["teacher.preset=null", "teacher.means=[[1,0,0],[0,1,0],[0,0,1],[-1,-1,-1]]", "teacher.std=0.12"]

CASES = {
    "ring8": ("recipes/toy_ring8_dmd2.yaml", []),
    # ablations: what the regression warm start alone gives, and DMD2 alone (same total budget)
    "ring8-warm-only": ("recipes/toy_ring8_dmd2.yaml", ["train.steps=0"]),
    "ring8-dmd-only": ("recipes/toy_ring8_dmd2.yaml", ["student.warm_start.steps=0", "train.steps=4000"]),
    "ring8-4step": ("recipes/toy_ring8_dmd2_4step.yaml", []),
    "unequal5-2d": ("recipes/toy_ring8_dmd2.yaml", EXPLICIT_5),
    "modes4-3d": ("recipes/toy_ring8_dmd2.yaml", EXPLICIT_3D),
    "cond-cfg2": ("recipes/toy_cond_dmd2.yaml", []),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=list(CASES))
    parser.add_argument("--out", default="benchmarks/results/toy_dmd2.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    rows = []
    for name in args.only:
        recipe, overrides = CASES[name]
        with tempfile.TemporaryDirectory() as tmp:
            run = train_toy(recipe, tmp, overrides + ["train.sample_every=0"])
        labels = [0, 1] if run.models.conditioner is not None else [None]
        steps = [None] if run.models.student.num_steps == 1 else [1, 2, None]
        for label in labels:
            for k in steps:
                r = evaluate(run, label=label, steps=k)
                rows.append({"case": name, "label": label, "steps": k or run.models.student.num_steps,
                             "energy": r.energy, "precision": r.precision, "max_weight_error": r.max_weight_error,
                             "coverage": r.coverage, "spread": r.spread_ratio, "train_seconds": run.seconds})
    print(f"{'case':<13} {'label':>5} {'steps':>5} {'energy':>8} {'prec':>6} {'w err':>6} {'cover':>5} "
          f"{'spread':>6} {'time s':>7}  targets: energy<=0.005 prec>=0.95 w err<=0.03 time<=120")
    for r in rows:
        print(f"{r['case']:<13} {str(r['label']):>5} {r['steps']:>5} {r['energy']:>8.5f} {r['precision']:>6.3f} "
              f"{r['max_weight_error']:>6.3f} {r['coverage']:>5} {r['spread']:>6.2f} {r['train_seconds']:>7.1f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
