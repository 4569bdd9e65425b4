"""``distill demo`` and ``distill pretrain-demo-teacher``: the README's main job on the sklearn digits.

``distill demo --out runs/demo [--methods dmd2,sid,lcm]``:

1. trains (or reuses from the cache) the digits classifier of the metric (metrics/digits.py) and the digits
   teacher, a diffusers ``UNet2DModel`` pipeline folder (distill/digits_teacher.py);
2. distils it with each method's recipe (``recipes/digits_<method>.yaml``, teacher path filled in) through the
   same code as ``distill train`` and exports each student as a diffusers pipeline (``distill export``);
3. samples the teacher (DDIM 50 / 4 / 1 steps) and every student with the same noise and labels, scores them
   with the digits metric, times them, and writes ``report.md``, ``samples.png`` and ``results.json``.

Everything is offline (the digits ship with scikit-learn) and sized for a 2-core CPU.
"""
from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from distill.models.errors import ToolkitError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
#: method name on the command line -> (recipe file, label in the report)
METHODS = {
    "dmd2": ("digits_dmd2.yaml", "DMD2 student"),
    "dmd2_4step": ("digits_dmd2_4step.yaml", "DMD2 4-step student"),
    "sid": ("digits_sid.yaml", "SiD student"),
    "lcm": ("digits_lcm.yaml", "consistency (LCM) student"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="distil the digits teacher to one step and write a report (offline, CPU)",
                              description="Train (or reuse) the sklearn-digits teacher, distil it with each method, "
                                          "and write OUT/report.md with a figure, a quality/speed table and the "
                                          "checkpoint and exported pipeline locations.")
    p.add_argument("--out", required=True, help="report folder (runs, exports, report.md, samples.png)")
    p.add_argument("--methods", default="dmd2", help=f"comma-separated, from {', '.join(METHODS)} (default dmd2)")
    p.add_argument("--teacher", default=None, help="teacher folder (default: <cache>/digits_teacher, "
                                                   "cache = $DISTILL_CACHE or ~/.cache/distill)")
    p.add_argument("--teacher-steps", type=int, default=None, help="teacher training steps (default: the tuned value)")
    p.add_argument("--n-eval", type=int, default=1000, help="samples per sampler for the metric (default 1000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", default=[], help="recipe overrides for every method, e.g. train.steps=100")
    p.set_defaults(func=cmd_demo)

    p = subparsers.add_parser("pretrain-demo-teacher", help="train and cache the sklearn-digits teacher pipeline")
    p.add_argument("--out", default=None, help="teacher folder (default: <cache>/digits_teacher)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the tuned value)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_pretrain)


def _teacher_config(steps: int | None, seed: int):
    from distill.digits_teacher import DigitsTeacherConfig

    cfg = DigitsTeacherConfig(seed=seed)
    if steps is not None:
        if steps <= 0:
            raise ToolkitError("--teacher-steps / --steps must be positive")
        cfg.steps = steps
    return cfg


def cmd_pretrain(args: argparse.Namespace) -> int:
    from distill.digits_teacher import ensure_digits_teacher

    folder = ensure_digits_teacher(args.out, _teacher_config(args.steps, args.seed), progress=not args.no_progress)
    print(f"digits teacher: {folder}  (recipes: teacher: {{kind: auto, path: {folder}}})")
    return 0


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if not methods or unknown:
        raise ToolkitError(f"unknown method(s) {', '.join(unknown) or '(none)'} in --methods; "
                           f"choose from {', '.join(METHODS)}")
    for m in methods:
        if not (RECIPES_DIR / METHODS[m][0]).is_file():
            raise ToolkitError(f"recipe {RECIPES_DIR / METHODS[m][0]} not found (run from a checkout of the toolkit)")
    return list(dict.fromkeys(methods))


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _command(argv: list[str]) -> int:
    """Run one ``distill`` command (parsed by the CLI's own parser) and return its exit code."""
    from distill.cli import build_parser

    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


def _teacher_rows(out: Path, teacher_dir: Path, args: argparse.Namespace, sample, score):
    """The teacher's rows (DDIM 50 / 4 / 1 steps) and its figure columns, cached in ``OUT/teacher_rows.pt``.

    The 50-step DDIM over ``n_eval`` samples is the demo's slowest evaluation; a rerun with the same ``--out``
    (e.g. with another ``--methods``) reuses it when the teacher weights file (size and mtime), ``n_eval`` and
    the seed are unchanged. The cached ms / sample were measured by the run that wrote the cache.
    """
    import json
    from dataclasses import asdict

    from distill.demo_report import Row

    weights = next(iter(sorted((Path(teacher_dir) / "unet").glob("*.safetensors"))), None)
    stat = weights.stat() if weights is not None else None
    key = json.dumps({"teacher": str(teacher_dir), "weights": [stat.st_size, stat.st_mtime_ns] if stat else None,
                      "n_eval": args.n_eval, "seed": args.seed})
    cache = out / "teacher_rows.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        if saved.get("key") == key:
            print(f"      reusing {cache} (same teacher, --n-eval and --seed)")
            return [Row(**json.loads(r)) for r in saved["rows"]], dict(saved["figure"])
    rows, figure_columns = [], {}
    for steps in (50, 4, 1):
        x, seconds = sample(steps)
        rows.append(score(f"teacher DDIM {steps} step{'s' if steps > 1 else ''}", steps, x, seconds))
        if steps in (50, 1):
            figure_columns[f"teacher, {steps} step{'s' if steps > 1 else ''}"] = x
    torch.save({"key": key, "rows": [json.dumps(asdict(r)) for r in rows], "figure": figure_columns}, cache)
    return rows, figure_columns


def cmd_demo(args: argparse.Namespace) -> int:
    from distill.commands import load_run
    from distill.demo_report import Row, save_figure, write_report
    from distill.digits_teacher import ensure_digits_teacher
    from distill.metrics.digits import digits_report, load_digits_classifier, two_sample_floor
    from distill.models.loading import load_pipeline_components
    from distill.models.roles import Teacher
    from distill.samplers import sample_ddim, sample_student

    # every check a user can fail happens here, before any training
    methods = parse_methods(args.methods)
    if args.n_eval < 20:
        raise ToolkitError("--n-eval must be at least 20 (precision/recall and FD need samples of every class)")
    for item in args.overrides:
        if "=" not in item:
            raise ToolkitError(f"override {item!r} must look like key.subkey=value")
    teacher_cfg = _teacher_config(args.teacher_steps, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    t_total = time.perf_counter()

    print("[1/4] digits classifier (metric) and teacher")
    (classifier, teacher_dir), teacher_seconds = _timed(lambda: (
        load_digits_classifier(seed=args.seed, progress=progress),
        ensure_digits_teacher(args.teacher, teacher_cfg, progress=progress)))
    parts = load_pipeline_components(str(teacher_dir), kind="auto")
    teacher = Teacher(parts.denoiser)
    schedule = parts.denoiser.schedule

    g = torch.Generator().manual_seed(args.seed + 12345)
    labels = torch.arange(args.n_eval) % 10
    noise = torch.randn(args.n_eval, *parts.latent_shape(1)[1:], generator=g)
    cond = parts.conditioner(labels)

    def score(name: str, nfe: int, images: torch.Tensor, seconds: float) -> Row:
        s = digits_report(images, labels, classifier)
        return Row(name, nfe, s.fd, s.accuracy, s.precision, s.recall, 1000 * seconds / len(images), len(images))

    print("[2/4] teacher samples (DDIM 50, 4, 1 steps)")
    t_eval = time.perf_counter()
    rows, figure_columns = _teacher_rows(out, teacher_dir, args, lambda steps: _timed(lambda: sample_ddim(
        teacher, noise, cond, schedule.inference_timesteps(steps, "trailing"))), score)
    eval_seconds = time.perf_counter() - t_eval

    print(f"[3/4] distillation: {', '.join(methods)}")
    runs, train_seconds = {}, 0.0
    for method in methods:
        recipe, label = METHODS[method]
        run_dir, export_dir = out / "runs" / method, out / "exports" / method
        overrides = [f"teacher.path={teacher_dir}", *args.overrides]
        # through the CLI's own parser, so every option keeps its default and its checks
        train_args = ["train", str(RECIPES_DIR / recipe), *overrides, "--out", str(run_dir),
                      *([] if progress else ["--no-progress"])]
        code, seconds = _timed(lambda: _command(train_args))
        if code:
            return code  # interrupted (130 / 143: the run resumes when the demo is run again) or refused
        train_seconds += seconds
        code = _command(["export", str(run_dir), "--out", str(export_dir)])
        if code:
            return code
        config, models = load_run(run_dir)
        student = models.student
        t_eval = time.perf_counter()
        for steps in sorted({student.num_steps, 1}, reverse=True):
            gen = torch.Generator().manual_seed(args.seed)
            x, seconds = _timed(lambda: sample_student(student, noise, cond, student.timesteps[:steps], generator=gen))
            name = f"{label} ({steps} step{'s' if steps > 1 else ''})"
            rows.append(score(name, steps, x, seconds))
            if steps == student.num_steps:
                figure_columns[name] = x
        eval_seconds += time.perf_counter() - t_eval
        from distill import checkpoint as ckpt

        runs[method] = {"run": str(run_dir), "recipe": f"recipes/{recipe}", "export": str(export_dir),
                        "checkpoint": str(ckpt.list_checkpoints(run_dir / "checkpoints")[-1]),
                        "train_seconds": round(seconds, 1), "train_steps": config.train.steps}

    print("[4/4] report")
    floor = two_sample_floor(classifier, seed=args.seed)
    floor_row = Row("real digits (half vs all: the floor)", 0, floor.fd, floor.accuracy, floor.precision,
                    floor.recall, 0.0, floor.n)
    figure = save_figure(figure_columns, out / "samples.png")
    info = {"teacher_dir": str(teacher_dir), "teacher_params": sum(p.numel() for p in parts.unet.parameters()) / 1e6,
            "classifier_accuracy": classifier.test_accuracy, "runs": runs,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "teacher_seconds": teacher_seconds, "train_seconds": train_seconds, "eval_seconds": eval_seconds,
            "total_seconds": time.perf_counter() - t_total}
    report = write_report(out, rows, floor_row, info, figure)
    print(f"report: {report}")
    return 0
