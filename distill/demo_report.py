"""The demo's report folder: a figure (one row per class) and ``report.md`` (what, how good, how fast, where).

Pure presentation: every number comes in through :class:`Row` (measured by ``distill/demo.py``).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass
class Row:
    """One sampler's line of the table."""

    name: str  # e.g. "teacher DDIM 50 steps", "DMD2 student (1 step)"
    nfe: int  # network evaluations per sample
    digits_fd: float
    class_accuracy: float | None
    precision: float
    recall: float
    ms_per_sample: float  # wall-clock sampling time per sample (batch of n, CPU)
    n: int


def save_figure(columns: dict[str, torch.Tensor], path: Path, per_class: int = 6) -> Path:
    """Grid of digits: one row per class 0..9, for each column group ``per_class`` samples.

    ``columns`` maps a title to images ``[10 * m, 1, 8, 8]`` in [-1, 1] whose labels are ``arange % 10``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(columns.items())
    fig, axes = plt.subplots(1, len(groups), figsize=(1.9 * len(groups) * per_class / 6 + 0.4, 3.6), dpi=110)
    axes = [axes] if len(groups) == 1 else list(axes)
    for ax, (title, images) in zip(axes, groups):
        images = ((images.float().clamp(-1, 1) + 1) / 2).cpu()
        labels = torch.arange(len(images)) % 10
        rows = []
        for c in range(10):
            picked = images[labels == c][:per_class]
            rows.append(torch.cat(list(torch.nn.functional.pad(picked, (1, 1, 1, 1), value=0.0)[:, 0]), dim=1))  # white gaps
        ax.imshow(torch.cat(rows, dim=0).numpy(), cmap="gray_r", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([(i + 0.5) * 10 for i in range(10)], [str(i) for i in range(10)], fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def write_report(out: Path, rows: list[Row], floor: Row, info: dict, figure: Path) -> Path:
    """``report.md`` and ``results.json`` in ``out``; ``info`` has teacher, runs, exports, timings, machine."""
    teacher = next(r for r in rows if r.name.startswith("teacher DDIM 50"))
    lines = [
        "# Distillation demo: sklearn digits, teacher -> one-step student", "",
        f"**What was distilled.** A class-conditional diffusers `UNet2DModel` ({info['teacher_params']:.2f} M "
        f"parameters, v-prediction, DDPM linear schedule, 1000 steps) trained on the 1,797 handwritten 8x8 digits "
        f"of `sklearn.datasets.load_digits` (teacher folder: `{info['teacher_dir']}`). It samples with DDIM in "
        f"{teacher.nfe} network evaluations; the students below are copies of it trained to sample in 1-4.", "",
        f"![samples]({figure.name})", "",
        "Each row is one class (0-9); columns: the teacher with 50 DDIM steps, the teacher with 1 step, "
        "then each student. Same noise and labels in every column.", "",
        "## How good, how fast", "",
        "| sampler | NFE / sample | digits FD (lower is better) | class accuracy | precision | recall | "
        "ms / sample | speed-up vs teacher 50 steps |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows + [floor]:
        speed = "" if r is floor else f"{teacher.ms_per_sample / max(r.ms_per_sample, 1e-9):.1f}x"
        nfe = "" if r is floor else str(r.nfe)
        ms = "" if r is floor else _fmt(r.ms_per_sample, 3)
        lines.append(f"| {r.name} | {nfe} | {_fmt(r.digits_fd, 2)} | {_fmt(r.class_accuracy)} | {_fmt(r.precision)} | "
                     f"{_fmt(r.recall)} | {ms} | {speed} |")
    lines += [
        "",
        f"- **digits FD**: Frechet distance between {teacher.n} generated digits (labels 0-9 uniformly) and all "
        "1,797 real digits, in the 64-d penultimate features of a small CNN classifier trained on the digits "
        f"(held-out accuracy {info['classifier_accuracy']:.3f}); the last row is half of the real digits against "
        "all of them, the floor that finite samples allow.",
        "- **class accuracy**: how often that classifier reads a sample generated for label c as c.",
        "- **precision / recall**: Kynkaanniemi et al. 2019 (k = 3) in the same features: precision = how many "
        "samples look like real digits, recall = how much of the real variety the samples cover (mode collapse "
        "lowers recall).",
        f"- **time**: wall clock for {teacher.n} samples in one batch on this machine ({info['machine']}), "
        "network evaluations only (no evaluation, no PNG writing).",
        "", "## Where things are", "",
    ]
    for method, where in info["runs"].items():
        lines.append(f"- **{method}**: run folder `{where['run']}` (recipe `{where['recipe']}`, checkpoint "
                     f"`{where['checkpoint']}`), exported diffusers pipeline `{where['export']}` "
                     f"(`DiffusionPipeline.from_pretrained` loads it; `distill_student.json` says how to call it).")
    lines += [f"- figure: `{figure.name}`; all numbers: `results.json`.", "",
              f"Total time: {info['total_seconds']:.0f} s (teacher {info['teacher_seconds']:.0f} s, distillation "
              f"{info['train_seconds']:.0f} s, evaluation {info['eval_seconds']:.0f} s).", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines))
    (out / "results.json").write_text(json.dumps({"rows": [asdict(r) for r in rows], "floor": asdict(floor),
                                                  **info}, indent=2, default=str))
    return report
