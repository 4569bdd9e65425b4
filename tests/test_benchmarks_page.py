"""benchmarks/run_all.py --no-run: BENCHMARKS.md from result JSON, GPU rows kept from benchmarks/results_gpu/.

No benchmark runs here: the CPU results are small fabricated JSON files in a temporary folder, so the test checks
the page's logic (targets met or not, speed-ups, which rows are marked not measured), not any measurement.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import ``benchmarks/<name>.py`` (not a package) under a private module name."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def run_all(tmp_path, monkeypatch):
    module = _load("run_all")
    monkeypatch.setattr(module, "RESULTS", tmp_path / "results")
    (tmp_path / "results").mkdir()
    return module


def _row(name, nfe, fd, acc, recall, ms):
    return {"name": name, "nfe": nfe, "digits_fd": fd, "class_accuracy": acc, "precision": 0.9, "recall": recall,
            "ms_per_sample": ms, "n": 1000}


def _digits(results: Path) -> None:
    rows = [_row("teacher DDIM 50 steps", 50, 2.0, 0.95, 0.90, 100.0), _row("teacher DDIM 4 steps", 4, 16.0, 0.99, 0.5, 8.0),
            _row("teacher DDIM 1 step", 1, 80.0, 0.9, 0.0, 2.0),
            _row("good student (1 step)", 1, 2.5, 0.95, 0.85, 2.0),  # 1.25x, recall -0.05: every target met
            _row("blurry student (4 steps)", 4, 3.2, 0.95, 0.85, 8.0),  # 1.6x: FD target missed
            _row("blurry student (1 step)", 1, 30.0, 0.95, 0.2, 2.0)]  # fewer steps than trained: no target line
    data = {"rows": rows}
    data["targets"] = _load("bench_digits").targets(data)  # the checks bench_digits.py writes
    (results / "digits.json").write_text(json.dumps(data))
    (results / "digits.run.json").write_text(json.dumps({"machine": "test machine", "seconds": 1.0, "exit": 0}))


def test_page_summary_targets_and_gpu_rows(run_all, tmp_path):
    _digits(tmp_path / "results")
    (tmp_path / "results" / "dmd2_overhead.json").write_text(json.dumps(
        {"ratio": 1.3, "target": 1.15, "iteration_ms": 13.0, "essential_sum_ms": 10.0}))
    out = tmp_path / "BENCHMARKS.md"
    assert run_all.main(["--no-run", "--out", str(out)]) == 0
    page = out.read_text()
    lines = page.splitlines()

    def summary_line(figure: str) -> str:
        hits = [line for line in lines if line.startswith(f"| {figure}")]
        assert len(hits) == 1, (figure, hits)
        return hits[0]

    good = summary_line("digits: good student (1 step)")
    assert "1.25x the teacher's 50-step 2.00" in good and "| yes |" in good and "test machine" in good
    assert "| no |" in summary_line("digits: blurry student (4 steps)")
    assert not [line for line in lines if line.startswith("| digits: blurry student (1 step)")]
    # speed-up over the teacher's 50 steps: 100 ms / 2 ms
    assert "50.0x (1 NFE" in summary_line("sampler speed-up over the teacher's 50 DDIM steps: good student")
    overhead = summary_line("engine overhead")
    assert "1.300" in overhead and "| no |" in overhead
    # a CPU benchmark without results is marked, not dropped
    assert "not yet measured" in summary_line("Toys: SiD and SIM on ring8")
    # GPU rows come from the committed JSON with their command and machine
    gpu = json.loads((ROOT / "benchmarks" / "results_gpu" / "fid_throughput.json").read_text())
    ours = next(r for r in gpu["rows"] if r["size"] == 256 and r["path"] == "ours gen")
    theirs = next(r for r in gpu["rows"] if r["size"] == 256 and r["path"] == "clean-fid gen")
    fid = summary_line("FID pipeline vs clean-fid gen= path, 256 px")
    assert f"{ours['images_per_s'] / theirs['images_per_s']:.1f}x" in fid
    assert "`bash benchmarks/gpu_check.sh fid`" in fid and gpu["machine"]["gpu"] in fid
    assert "`bash benchmarks/gpu_check.sh memory`" in summary_line("bf16 DMD2 on an SDXL-layout UNet (width 0.5, "
                                                                   "latent 64, batch 4), 1 GPU, defaults")


def test_gpu_rows_are_not_runnable(run_all, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        run_all.main(["--only", "fid_gpu", "--out", str(tmp_path / "B.md")])
    assert info.value.code == 2
    assert "gpu_check.sh" in capsys.readouterr().err
