"""Run the benchmarks and write BENCHMARKS.md: one page, every row with the command that produced it.

Sections (each a script in benchmarks/ writing JSON to benchmarks/results/):

* digits -- every digits recipe against the digits teacher at 1, 4 and 50 DDIM steps and the two-sample floor
  (bench_digits.py; the issue's targets checked per student);
* toys -- DMD2, SiD/SIM, consistency and ESD on analytic teachers against the truth (bench_toy_*.py,
  bench_esd_lambda.py) and the teacher's DDIM at 1-50 steps against the floor (bench_teacher_ddim.py);
* engine overhead -- a DMD2 iteration against its essential passes (bench_dmd2_overhead.py);
* FID pipeline speed against clean-fid's (bench_fid_throughput.py).

    python benchmarks/run_all.py                  # run everything (long: tens of minutes on 2 cores)
    python benchmarks/run_all.py --only digits    # run some; the others are read from earlier results or
                                                  # marked "not yet measured"
    python benchmarks/run_all.py --no-run         # only rewrite BENCHMARKS.md from benchmarks/results/

The sampler speed-up over the teacher is the digits table's "ms / sample" column (same batch, same machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Bench:
    name: str
    title: str
    script: str
    result: str  # JSON under benchmarks/results/
    args: tuple = ()

    @property
    def command(self) -> str:
        return " ".join(["python", f"benchmarks/{self.script}", *self.args])


BENCHES = [
    Bench("digits", "Digits: every method against the digits teacher (n = 1000 per row)", "bench_digits.py",
          "digits.json"),
    Bench("teacher_ddim", "Toy teacher (ring8): DDIM steps against the two-sample floor", "bench_teacher_ddim.py",
          "teacher_ddim.json"),
    Bench("toy_dmd2", "Toys: DMD2 (one and four steps, ablations)", "bench_toy_dmd2.py", "toy_dmd2.json"),
    Bench("toy_methods", "Toys: SiD and SIM (DMD2 for reference)", "bench_toy_methods.py", "toy_methods.json"),
    Bench("toy_consistency", "Toys: consistency student at 1/2/4 steps beside teacher DDIM",
          "bench_toy_consistency.py", "toy_consistency.json"),
    Bench("esd_lambda", "Toys: ESD's entropy weight", "bench_esd_lambda.py", "esd_lambda.json"),
    Bench("dmd2_overhead", "Engine overhead: DMD2 iteration against its essential passes", "bench_dmd2_overhead.py",
          "dmd2_overhead.json"),
    Bench("fid_throughput", "FID pipeline speed against clean-fid", "bench_fid_throughput.py", "fid_throughput.json"),
]


def machine() -> str:
    import torch

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.machine()} {os.cpu_count()} CPUs ({gpu}), torch {torch.__version__}, "
            f"{platform.python_version()}, load average {load:.1f} at start")


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)[:80]
    return str(value)


def table(rows: list[dict]) -> list[str]:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    out += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return out


def render(data) -> list[str]:
    """Tables for the list-of-dict parts of a result JSON; anything else as a JSON block."""
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return table(data)
    if isinstance(data, dict):
        lines = []
        scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
        for key, value in data.items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                lines += [f"*{key}*", "", *table(value), ""]
            elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                lines += [f"*{key}*", "", *table([{"": k, **v} for k, v in value.items()]), ""]
        if scalars:
            lines += ["", "```json", json.dumps(scalars, indent=1, default=str), "```"]
        return lines or ["```json", json.dumps(data, indent=1, default=str)[:4000], "```"]
    return ["```json", json.dumps(data, indent=1, default=str)[:4000], "```"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the benchmarks and write BENCHMARKS.md")
    parser.add_argument("--only", nargs="*", default=None, help=f"benchmarks to run: {', '.join(b.name for b in BENCHES)}")
    parser.add_argument("--no-run", action="store_true", help="only rewrite BENCHMARKS.md from existing results")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - {b.name for b in BENCHES}
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}")
    here = machine()
    runs = {}
    for bench in BENCHES:
        if args.no_run or (args.only is not None and bench.name not in args.only):
            continue
        print(f"== {bench.command}", flush=True)
        start = time.time()
        code = subprocess.call([sys.executable, str(ROOT / "benchmarks" / bench.script), *bench.args], cwd=ROOT)
        runs[bench.name] = {"seconds": time.time() - start, "exit": code, "machine": here}
        (RESULTS / f"{bench.name}.run.json").write_text(json.dumps(runs[bench.name]))
    lines = ["# Benchmarks", "", "Written by `python benchmarks/run_all.py`. Each section names the command that "
             "produced it and the machine it ran on; sections without results are marked as not yet measured.", ""]
    for bench in BENCHES:
        lines += [f"## {bench.title}", "", f"Command: `{bench.command}`", ""]
        result, meta = RESULTS / bench.result, RESULTS / f"{bench.name}.run.json"
        if not result.is_file():
            lines += ["**Not yet measured.**", ""]
            continue
        info = json.loads(meta.read_text()) if meta.is_file() else {}
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(result.stat().st_mtime))
        lines += [f"Machine: {info.get('machine', 'not recorded')}; measured {when}"
                  + (f", {info['seconds']:.0f} s, exit {info['exit']}" if "seconds" in info else ""), ""]
        if info.get("note"):
            lines += [f"Note: {info['note']}", ""]
        if bench.name == "digits" and (RESULTS / "digits" / "report.md").is_file():
            report = (RESULTS / "digits" / "report.md").read_text().split("## How good, how fast", 1)[-1]
            lines += [report.split("## Where things are")[0].strip(), ""]
            data = json.loads(result.read_text())
            lines += ["Targets (issue 13):", "", *table(data.get("targets", [])), ""]
        else:
            lines += [*render(json.loads(result.read_text())), ""]
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(r["exit"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
