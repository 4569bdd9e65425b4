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

GPU rows (FID pipeline speed on CUDA, bf16 DMD2 memory) are never run here: `bash benchmarks/gpu_check.sh fid`
and `... memory` measure them on a CUDA machine, and their JSON is committed in benchmarks/results_gpu/ (copy a
new measurement there to replace it). Every run of this script keeps those rows and regenerates the CPU rows.
The page opens with a summary table (one line per headline figure, with its target, command and machine),
built from the same JSON files as the sections below it.
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
RESULTS_GPU = ROOT / "benchmarks" / "results_gpu"  # committed: measured on a CUDA machine, not rerun here


@dataclass
class Bench:
    name: str
    title: str
    script: str
    result: str  # JSON under benchmarks/results/ (benchmarks/results_gpu/ for GPU rows)
    args: tuple = ()
    gpu: str | None = None  # GPU rows: `gpu_check.sh` part that measured it; read from results_gpu/, never run

    @property
    def command(self) -> str:
        if self.gpu:
            return f"bash benchmarks/gpu_check.sh {self.gpu}"
        return " ".join(["python", f"benchmarks/{self.script}", *self.args])

    @property
    def result_path(self) -> Path:
        return (RESULTS_GPU if self.gpu else RESULTS) / self.result


BENCHES = [
    Bench("digits", "Digits: every method against the digits teacher (n = 1000 per row)", "bench_digits.py",
          "digits.json"),
    Bench("teacher_ddim", "Toy teacher (ring8): DDIM steps against the two-sample floor", "bench_teacher_ddim.py",
          "teacher_ddim.json"),
    Bench("toy_dmd2", "Toys: DMD2 on ring8 (one and four steps)", "bench_toy_dmd2.py", "toy_dmd2.json",
          ("--only", "ring8", "ring8-4step")),
    Bench("toy_methods", "Toys: SiD and SIM on ring8", "bench_toy_methods.py", "toy_methods.json",
          ("--methods", "sid", "sim", "--teachers", "ring8")),
    Bench("toy_consistency", "Toys: consistency student at 1/2/4 steps beside teacher DDIM",
          "bench_toy_consistency.py", "toy_consistency.json"),
    Bench("esd_lambda", "Toys: ESD's entropy weight (two-class ring, teacher CFG 3)", "bench_esd_lambda.py",
          "esd_lambda.json", ("--lambdas", "0", "1", "1.5")),
    Bench("dmd2_overhead", "Engine overhead: DMD2 iteration against its essential passes", "bench_dmd2_overhead.py",
          "dmd2_overhead.json"),
    Bench("fid_throughput", "FID pipeline speed against clean-fid (CPU)", "bench_fid_throughput.py",
          "fid_throughput.json"),
    Bench("fid_gpu", "FID pipeline speed against clean-fid (GPU)", "bench_fid_throughput.py", "fid_throughput.json",
          gpu="fid"),
    Bench("memory_gpu", "GPU memory and step time: bf16 DMD2 on an SDXL-layout UNet", "bench_gpu_memory.py",
          "gpu_memory.json", gpu="memory"),
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
    if isinstance(value, list):  # short lists (mode weights, per-GPU peaks) inline, numbers rounded
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_cell(v)}" for k, v in value.items())[:200]
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
        lines, scalars = [], {}  # scalars: everything that is not a table, shown as one JSON block
        for key, value in data.items():
            if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
                lines += [f"*{key}*", "", *table(value), ""]
            elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                lines += [f"*{key}*", "", *table([{"": k, **v} for k, v in value.items()]), ""]
            else:
                scalars[key] = value
        if scalars:
            lines += ["", "```json", json.dumps(scalars, indent=1, default=str), "```"]
        return lines or ["```json", json.dumps(data, indent=1, default=str)[:4000], "```"]
    return ["```json", json.dumps(data, indent=1, default=str)[:4000], "```"]


def _meta(bench: Bench) -> dict:
    """The run's machine, time and note: `<name>.run.json` beside the result (written when this script ran it;
    committed by hand for the GPU rows)."""
    path = bench.result_path.with_name(f"{bench.name}.run.json")
    return json.loads(path.read_text()) if path.is_file() else {}


def _when(bench: Bench, meta: dict) -> str:
    if meta.get("measured"):
        return meta["measured"]
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(bench.result_path.stat().st_mtime))


def section(bench: Bench) -> list[str]:
    """One benchmark's section: command, machine, note and its tables."""
    lines = [f"## {bench.title}", "", f"Command: `{bench.command}`", ""]
    if not bench.result_path.is_file():
        return lines + ["**Not yet measured.**", ""]
    info = _meta(bench)
    lines += [f"Machine: {info.get('machine', 'not recorded')}; measured {_when(bench, info)}"
              + (f", {info['seconds']:.0f} s, exit {info['exit']}" if "seconds" in info else ""), ""]
    if info.get("note"):
        lines += [f"Note: {info['note']}", ""]
    data = json.loads(bench.result_path.read_text())
    report = RESULTS / "digits" / "report.md"
    if bench.name == "digits" and report.is_file():
        text = report.read_text().split("## How good, how fast", 1)[-1]
        lines += [text.split("## Where things are")[0].strip(), ""]
        lines += ["Targets (issue 13):", "", *table(data.get("targets", [])), ""]
    else:
        lines += [*render(data), ""]
    return lines


def summary_lines() -> list[str]:
    """The page's first table: one line per headline figure, each with its target, command and machine."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from summary import SUMMARIES  # benchmarks/summary.py: per benchmark, its result JSON -> summary rows

    rows = []
    for bench in BENCHES:
        extract = SUMMARIES.get(bench.name)
        if extract is None:
            continue
        if not bench.result_path.is_file():
            rows.append({"figure": bench.title, "result": "not yet measured", "target": "", "met": "",
                         "command": f"`{bench.command}`", "machine": ""})
            continue
        info = _meta(bench)
        machine = f"{info.get('machine', 'not recorded')}, {_when(bench, info)}"
        for row in extract(json.loads(bench.result_path.read_text())):
            rows.append({**row, "command": f"`{bench.command}`", "machine": machine})
    return ["## Summary", "", "Each line: what was measured, the result, the target it is held to (if any), whether "
            "it is met, the command that produced it and the machine it ran on. Sections below have the full "
            "tables.", "", *table(rows), ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="run the benchmarks and write BENCHMARKS.md")
    names = [b.name for b in BENCHES if not b.gpu]
    parser.add_argument("--only", nargs="*", default=None, help=f"benchmarks to run: {', '.join(names)}")
    parser.add_argument("--no-run", action="store_true", help="only rewrite BENCHMARKS.md from existing results")
    parser.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = parser.parse_args(argv)
    unknown = set(args.only or ()) - set(names)
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(sorted(unknown))} (GPU rows are measured by "
                     "benchmarks/gpu_check.sh and read from benchmarks/results_gpu/)")
    here = machine()
    runs = {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for bench in BENCHES:
        if bench.gpu or args.no_run or (args.only is not None and bench.name not in args.only):
            continue
        print(f"== {bench.command}", flush=True)
        start = time.time()
        code = subprocess.call([sys.executable, str(ROOT / "benchmarks" / bench.script), *bench.args], cwd=ROOT)
        runs[bench.name] = {"seconds": time.time() - start, "exit": code, "machine": here}
        (RESULTS / f"{bench.name}.run.json").write_text(json.dumps(runs[bench.name]))
    lines = ["# Benchmarks", "", "Written by `python benchmarks/run_all.py`. Each section names the command that "
             "produced it and the machine it ran on; sections without results are marked as not yet measured. "
             "GPU rows come from `bash benchmarks/gpu_check.sh` on a CUDA machine (results committed in "
             "`benchmarks/results_gpu/`); the CPU rows are regenerated by this script.", ""]
    lines += summary_lines()
    for bench in BENCHES:
        lines += section(bench)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0 if all(r["exit"] == 0 for r in runs.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
