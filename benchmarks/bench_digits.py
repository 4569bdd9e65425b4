"""Every digits recipe against the digits teacher: the demo's table for dmd2, dmd2_4step, sid and lcm.

Runs ``distill demo --out benchmarks/results/digits --methods dmd2,dmd2_4step,sid,lcm`` (teacher DDIM at 50, 4
and 1 steps, each student at its steps and at 1 step, real digits as the two-sample floor; n = 1000 per row)
and checks the issue's targets per one-step/few-step student: digits FD within 1.5x of the teacher's 50-step
FD and below its 1- and 4-step FD, class accuracy >= 0.9, recall at most 0.1 below the teacher's.

    python benchmarks/bench_digits.py [--methods dmd2,sid] [recipe overrides ...]

Writes benchmarks/results/digits/{report.md, results.json, samples.png} and benchmarks/results/digits.json.
Finished runs in benchmarks/results/digits/runs/ are reused (same recipe); the teacher's rows are always
recomputed, so that every ms / sample in the table comes from one run on one machine state.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distill.cli import main as distill_main

OUT = Path("benchmarks/results/digits")


def targets(results: dict) -> list[dict]:
    """Per student row: the issue's four checks, with the numbers they compare."""
    rows = {r["name"]: r for r in results["rows"]}
    t50, t4, t1 = (rows[f"teacher DDIM {k}"] for k in ("50 steps", "4 steps", "1 step"))
    checks = []
    for r in results["rows"]:
        if r["name"].startswith("teacher"):
            continue
        checks.append({"sampler": r["name"], "fd": r["digits_fd"], "fd_ratio_vs_teacher50": r["digits_fd"] / t50["digits_fd"],
                       "fd_within_1.5x": r["digits_fd"] <= 1.5 * t50["digits_fd"],
                       "fd_below_teacher_1_and_4": r["digits_fd"] < min(t1["digits_fd"], t4["digits_fd"]),
                       "accuracy_ge_0.9": r["class_accuracy"] >= 0.9,
                       "recall_within_0.1": r["recall"] >= t50["recall"] - 0.1})
    return checks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="dmd2,dmd2_4step,sid,lcm")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    # the demo caches the teacher's rows for reruns; here every time in the table comes from this one run
    (OUT / "teacher_rows.pt").unlink(missing_ok=True)
    code = distill_main(["demo", "--out", str(OUT), "--methods", args.methods, "--no-progress", *args.overrides])
    if code:
        return code
    results = json.loads((OUT / "results.json").read_text())
    results["targets"] = targets(results)
    Path("benchmarks/results/digits.json").write_text(json.dumps(results, indent=2))
    for check in results["targets"]:
        print(check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
