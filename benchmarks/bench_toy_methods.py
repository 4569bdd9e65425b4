"""SiD and SIM (and DMD2 for reference) on analytic teachers with the recipes' defaults: quality and time.

Teachers: ring8 (the recipes' preset), 5 modes in 2-D with weights [1,2,3,1,1]/8 and unequal stds, and 4 modes
in 3-D. Each row trains the method's toy recipe from scratch (regression warm start included in the time)
and compares 4000 student samples (EMA weights) with 4000 fresh samples of the mixture. Targets (issue):
energy <= 0.005, precision >= 0.95, every mode weight within 0.03 of the truth, <= 2 minutes on 2 CPU cores.

    python benchmarks/bench_toy_methods.py [--methods sid sim dmd2 flow_sid flow_dmd2] [--teachers ring8 ...]
        [--seeds 0 1 2] [recipe overrides ...]

Prints a table (wall and process CPU seconds, and the load average during the run) and writes
benchmarks/results/toy_methods.json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from distill.toy_eval import evaluate, train_toy

RECIPES = {"sid": "recipes/toy_ring8_sid.yaml", "sim": "recipes/toy_ring8_sim.yaml",
           "dmd2": "recipes/toy_ring8_dmd2.yaml",
           # the same under a flow-matching teacher (rectified flow, shift 3; issue 15)
           "flow_sid": "recipes/toy_ring8_flow_sid.yaml", "flow_dmd2": "recipes/toy_ring8_flow_dmd2.yaml"}
TEACHERS = {
    "ring8": [],
    "unequal5-2d": ["teacher.preset=null", "teacher.means=[[1.5,0],[0,1.5],[-1.5,0],[0,-1.5],[0,0]]",
                    "teacher.stds=[0.1,0.15,0.1,0.2,0.1]", "teacher.weights=[1,2,3,1,1]"],
    "modes4-3d": ["teacher.preset=null", "teacher.means=[[1,0,0],[0,1,0],[0,0,1],[-1,-1,-1]]", "teacher.std=0.12"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="*", default=["sid", "sim"])
    parser.add_argument("--teachers", nargs="*", default=list(TEACHERS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--out", default="benchmarks/results/toy_methods.json")
    parser.add_argument("overrides", nargs="*", help="extra recipe overrides for every run")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("THREADS", "2")))
    rows = []
    header = (f"{'method':<9} {'teacher':<12} {'seed':>4} {'energy':>8} {'prec':>6} {'w err':>6} {'cover':>5} "
              f"{'spread':>6} {'wall s':>7} {'cpu s':>6} {'load':>5}")
    print(header + "   targets: energy<=0.005 prec>=0.95 w err<=0.03 time<=120", flush=True)
    for method in args.methods:
        for teacher in args.teachers:
            for seed in args.seeds:
                cpu = time.process_time()
                with tempfile.TemporaryDirectory() as tmp:
                    run = train_toy(RECIPES[method], tmp, TEACHERS[teacher] + [f"train.seed={seed}",
                                                                                "train.sample_every=0"] + args.overrides)
                    cpu = time.process_time() - cpu
                    load = os.getloadavg()[0]
                    r = evaluate(run)
                row = {"method": method, "teacher": teacher, "seed": seed, "energy": r.energy,
                       "precision": r.precision, "max_weight_error": r.max_weight_error, "coverage": r.coverage,
                       "modes": run.models.mixture.num_components, "spread": r.spread_ratio,
                       "train_seconds": run.seconds, "cpu_seconds": cpu, "load": load,
                       "threads": torch.get_num_threads()}
                rows.append(row)
                print(f"{method:<9} {teacher:<12} {seed:>4} {r.energy:>8.5f} {r.precision:>6.3f} "
                      f"{r.max_weight_error:>6.3f} {r.coverage:>3}/{row['modes']} {r.spread_ratio:>6.2f} "
                      f"{run.seconds:>7.1f} {cpu:>6.1f} {load:>5.1f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
