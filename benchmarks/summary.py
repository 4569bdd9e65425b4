"""Headline rows for BENCHMARKS.md's summary table: one function per benchmark, result JSON -> rows.

Each function takes the JSON a ``bench_*.py`` script wrote (or a committed GPU result) and returns rows
``{"figure", "result", "target", "met"}``; ``run_all.py`` adds the command and the machine. Targets are the
issues' (toys: energy <= 0.005, precision >= 0.95, mode weights within 0.03, <= 2 minutes on 2 CPU cores;
digits: issue 13; engine overhead <= 1.10x; FID pipeline >= 5x clean-fid's ``gen=`` path with the value equal
to 1e-4). ``met`` is "yes", "no" or "" (no target).
"""
from __future__ import annotations

from typing import Callable

TOY_TARGET = "energy <= 0.005, precision >= 0.95, mode weights within 0.03, <= 120 s"


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def _toy_row(figure: str, r: dict, seconds: float | None, cpu_seconds: float | None = None) -> dict:
    """Quality and time are reported apart: on a shared machine the wall time says more about the load."""
    ok = r["energy"] <= 0.005 and r["precision"] >= 0.95 and r["max_weight_error"] <= 0.03
    time_text, met = "", _yes(ok)
    if seconds is not None:
        time_text = f", {seconds:.0f} s wall" + (f" / {cpu_seconds:.0f} s CPU" if cpu_seconds is not None else "")
        met = f"quality {_yes(ok)}, time {_yes(seconds <= 120)}"
    return {"figure": figure, "result": f"energy {r['energy']:.4f}, precision {r['precision']:.3f}, "
            f"max mode-weight error {r['max_weight_error']:.3f}{time_text}",
            "target": TOY_TARGET if seconds is not None else TOY_TARGET.rsplit(",", 1)[0], "met": met}


def _fewer_steps_than_trained(row: dict, students: list[dict]) -> bool:
    """A few-step student's row sampled with fewer steps (e.g. "X (1 step)" beside "X (4 steps)")."""
    base = row["name"].rsplit(" (", 1)[0]
    return any(o["name"].rsplit(" (", 1)[0] == base and o["nfe"] > row["nfe"] for o in students)


def digits(data: dict) -> list[dict]:
    """Per student: the issue 13 checks; then each sampler's speed-up over the teacher's 50 steps."""
    rows = {r["name"]: r for r in data["rows"]}
    t50 = rows["teacher DDIM 50 steps"]
    out = []
    students = [r for r in data["rows"] if not r["name"].startswith("teacher")]
    for check in data.get("targets", []):
        r = rows[check["sampler"]]
        if _fewer_steps_than_trained(r, students):
            continue  # no target for it: the section's table has the row
        met = all(check[k] for k in ("fd_within_1.5x", "fd_below_teacher_1_and_4", "accuracy_ge_0.9",
                                     "recall_within_0.1"))
        out.append({"figure": f"digits: {check['sampler']}",
                    "result": f"FD {r['digits_fd']:.2f} ({r['digits_fd'] / t50['digits_fd']:.2f}x the teacher's "
                              f"50-step {t50['digits_fd']:.2f}), class accuracy {r['class_accuracy']:.3f}, "
                              f"precision {r['precision']:.3f}, recall {r['recall']:.3f} (teacher {t50['recall']:.3f})",
                    "target": "FD <= 1.5x teacher 50 steps and < teacher 1 and 4 steps, accuracy >= 0.9, "
                              "recall >= teacher's - 0.1",
                    "met": _yes(met)})
    for r in data["rows"]:
        if r["name"] == t50["name"] or _fewer_steps_than_trained(r, students):
            continue
        out.append({"figure": f"sampler speed-up over the teacher's 50 DDIM steps: {r['name']}",
                    "result": f"{t50['ms_per_sample'] / max(r['ms_per_sample'], 1e-9):.1f}x ({r['nfe']} NFE, "
                              f"{r['ms_per_sample']:.2f} vs {t50['ms_per_sample']:.2f} ms / sample; "
                              f"FD {r['digits_fd']:.2f})",
                    "target": "", "met": ""})
    return out


def teacher_ddim(data: dict) -> list[dict]:
    steps = sorted(data["ddim"], key=int)
    text = ", ".join(f"{k} step{'s' if int(k) > 1 else ''} {data['ddim'][k]['ratio_to_floor']:.1f}x" for k in steps)
    return [{"figure": "ring8 teacher DDIM: energy distance / two-sample floor",
             "result": f"{text} (floor {data['floor']:.5f}, n = {data['n']})", "target": "", "met": ""}]


def toy_dmd2(data: list) -> list[dict]:
    out = []
    for r in data:
        if r["case"] == "ring8-4step" and r["steps"] != 4:
            continue  # the 4-step student at 1 and 2 of its steps: in the section's table
        label = "" if r.get("label") is None else f", label {r['label']}"
        out.append(_toy_row(f"toy DMD2 {r['case']} ({r['steps']} step{'s' if r['steps'] > 1 else ''}{label})", r,
                            r.get("train_seconds")))
    return out


def toy_methods(data: list) -> list[dict]:
    return [_toy_row(f"toy {r['method'].upper()} {r['teacher']} (1 step, seed {r['seed']})", r, r.get("train_seconds"),
                     r.get("cpu_seconds")) for r in data]


def toy_consistency(data: dict) -> list[dict]:
    out = []
    for r in data["rows"]:
        if r["model"] != "consistency student":
            continue
        teacher = next((t for t in data["rows"] if t["model"] == "teacher DDIM" and t.get("timesteps") == r["timesteps"]),
                       None)
        row = _toy_row(f"toy consistency (LCM) ring8, {r['steps']} steps {r['timesteps']}", r, None)
        if teacher is not None:
            row["result"] += f"; teacher DDIM on the same steps: energy {teacher['energy']:.4f}"
        row["result"] += f"; training {data['train_wall_s']:.0f} s"
        out.append(row)
    return out


def esd_lambda(data: list) -> list[dict]:
    lams = [r for r in data if isinstance(r["lambda"], (int, float))]
    spreads = [r["spread_ratio"] for r in sorted(lams, key=lambda r: r["lambda"])]
    rising = all(b >= a for a, b in zip(spreads, spreads[1:]))
    text = ", ".join(f"lambda {r['lambda']:g}: spread {r['spread_ratio']:.2f}" for r in lams)
    return [{"figure": "toy ESD (two-class ring, teacher CFG 3): within-mode spread vs the truth",
             "result": text, "target": "spread rises with lambda (lambda 0 = SDS collapses)", "met": _yes(rising)}]


def dmd2_overhead(data: dict) -> list[dict]:
    out = [{"figure": "engine overhead: DMD2 iteration / sum of its essential passes (tiny SDXL UNet)",
            "result": f"{data['ratio']:.3f} ({data['iteration_ms']:.1f} vs {data['essential_sum_ms']:.1f} ms)",
            "target": f"<= {data.get('target', 1.10)}", "met": _yes(data["ratio"] <= data.get('target', 1.10))}]
    if "fsdp" in data:
        f = data["fsdp"]
        out.append({"figure": f"engine overhead, FSDP on {f['processes']} processes", "result": f"{f['ratio']:.3f}",
                    "target": "", "met": ""})
    return out


def fid_throughput(data: dict) -> list[dict]:
    """``ours gen`` against ``clean-fid gen`` per image size (speed-up and the FID's relative difference)."""
    out = []
    cfg = data.get("config", {})
    gpu = cfg.get("device") == "cuda"
    for size in sorted({r["size"] for r in data["rows"]}):
        rows = {r["path"]: r for r in data["rows"] if r["size"] == size}
        ours, theirs = rows.get("ours gen"), rows.get("clean-fid gen")
        if ours is None or theirs is None:
            continue
        speed = ours["images_per_s"] / theirs["images_per_s"]
        diff = abs(theirs["fid_rel_diff_vs_ours_gen"])
        out.append({"figure": f"FID pipeline vs clean-fid gen= path, {size} px ({cfg.get('extractor', '?')}, "
                              f"{ours['images']} images, batch {cfg.get('batch_size', '?')}, {cfg.get('device') or 'cpu'})",
                    "result": f"{speed:.1f}x ({ours['images_per_s']:.0f} vs {theirs['images_per_s']:.0f} img/s), "
                              f"FID relative difference {diff:.1e}",
                    **({"target": ">= 5x, FID equal to 1e-4", "met": _yes(speed >= 5 and diff <= 1e-4)} if gpu else
                       {"target": "FID equal to 1e-4 (the 5x target is for a GPU)", "met": _yes(diff <= 1e-4)})})
    return out


def gpu_memory(data: dict) -> list[dict]:
    s = data["setup"]
    out = []
    for name, c in data["cases"].items():
        over = " ".join(c.get("overrides", [])) or "defaults"
        out.append({"figure": f"bf16 DMD2 on an SDXL-layout UNet (width {s['width']}, latent {s['latent']}, batch "
                              f"{s['batch']}), {c['gpus']} GPU, {over}",
                    "result": f"peak {max(c['peak_gib_per_gpu']):.2f} GiB, {c['step_seconds_median']:.2f} s / step "
                              f"(`distill plan` estimate {c['plan_gib_per_gpu']['total']:.1f} GiB)",
                    "target": "", "met": ""})
    return out


SUMMARIES: dict[str, Callable] = {
    "digits": digits, "teacher_ddim": teacher_ddim, "toy_dmd2": toy_dmd2, "toy_methods": toy_methods,
    "toy_consistency": toy_consistency, "esd_lambda": esd_lambda, "dmd2_overhead": dmd2_overhead,
    "fid_throughput": fid_throughput, "fid_gpu": fid_throughput, "memory_gpu": gpu_memory,
}
