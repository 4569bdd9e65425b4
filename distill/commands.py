"""``distill train``, ``distill sample`` and ``distill export``."""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from distill.models.errors import ToolkitError


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="distil a student from a recipe",
                              description="Train a student. Overrides are dotted key=value pairs, e.g. "
                                          "train.steps=500 method.guidance_scale=3.")
    p.add_argument("config", help="recipe YAML (see recipes/)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, samples, config.yaml)")
    p.add_argument("--resume", default="auto", help="auto (default: latest checkpoint in --out), none, or a path")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", help="key=value overrides")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("sample", help="sample from a trained student")
    p.add_argument("run", help="run folder written by `distill train`")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--out", required=True, help=".npy file (vector data) or folder of PNGs (images)")
    p.add_argument("--steps", type=int, default=None,
                   help="use the first K of the student's timesteps (default: all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional students)")
    p.add_argument("--prompt", default=None, help="prompt (text-to-image students)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if an EMA exists")
    p.add_argument("--batch-size", type=int, default=256)
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser("export", help="export a trained student to a diffusers folder or LoRA weights")
    p.add_argument("run", help="run folder written by `distill train`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-ema", action="store_true")
    p.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    from distill.build import build_run
    from distill.config import load_config, save_config
    from distill.engine import Trainer
    from distill.sample_grids import sample_grid_writer

    config = load_config(args.config, args.overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / "config.yaml")
    from distill import checkpoint as ckpt

    device = "cuda" if torch.cuda.is_available() else None
    resuming = args.resume != "none" and ckpt.resolve_resume(args.resume, out / "checkpoints") is not None
    models, method, data = build_run(config, device=device, warm_start=not resuming, progress=not args.no_progress)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, out,
                      resume=None if args.resume == "none" else args.resume,
                      sample_fn=sample_grid_writer(models, config), progress=not args.no_progress)
    if trainer.resumed_from is not None:
        print(f"resuming from {trainer.resumed_from}")
    logs = trainer.run()
    if trainer.accelerator.is_main_process:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if "loss" in k)
        print(f"done: {trainer.step} steps, checkpoints in {trainer.checkpoint_root}; {summary}")
    return 0


def load_run(run: str | Path, use_ema: bool = True):
    """Rebuild the models of a run and load its latest student weights. Returns (config, models)."""
    from distill import checkpoint as ckpt
    from distill.build import build_models, method_class
    from distill.config import load_config

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ToolkitError(f"{run} is not a run folder (no config.yaml); pass the --out folder of `distill train`")
    config = load_config(run / "config.yaml")
    found = ckpt.list_checkpoints(run / "checkpoints")
    if not found:
        raise ToolkitError(f"no checkpoint in {run / 'checkpoints'}; train first")
    if config.teacher.kind == "gmm":
        pass
    models = build_models(config, need_fake_score=False)
    weights, _, _ = ckpt.load_checkpoint(found[-1])
    from distill.engine import _load_trainable_state

    key = "student_ema" if use_ema and "student_ema" in weights else "student"
    _load_trainable_state(models.student, weights[key])
    models.student.eval()
    method_class(config.method["name"])  # validates the name
    return config, models


def cmd_sample(args: argparse.Namespace) -> int:
    from distill.samplers import sample_student
    from distill.sample_grids import decode_to_images, save_images

    if args.n <= 0:
        raise ToolkitError("--n must be positive")
    config, models = load_run(args.run, use_ema=not args.no_ema)
    student = models.student
    timesteps = student.timesteps if args.steps is None else student.timesteps[:args.steps]
    if args.steps is not None and not 1 <= args.steps <= student.num_steps:
        raise ToolkitError(f"--steps must be between 1 and {student.num_steps} (the student's timesteps)")
    cond = _sample_cond(models, args)
    g = torch.Generator().manual_seed(args.seed)
    chunks = []
    for start in range(0, args.n, args.batch_size):
        n = min(args.batch_size, args.n - start)
        z = torch.randn(n, *models.sample_shape, generator=g)
        c = cond(n) if cond is not None else None
        chunks.append(sample_student(student, z, c, timesteps, generator=g))
    samples = torch.cat(chunks)
    out = Path(args.out)
    if len(models.sample_shape) == 1:
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out if out.suffix == ".npy" else out.with_suffix(".npy"), samples.numpy())
        print(f"wrote {args.n} samples to {out}")
    else:
        save_images(decode_to_images(samples, models), out)
        print(f"wrote {args.n} images to {out}/")
    return 0


def _sample_cond(models, args):
    if models.mixture is not None:
        if models.conditioner is None:
            if args.label is not None:
                raise ToolkitError("--label given but the teacher has no classes")
            return None
        if args.label is None:
            raise ToolkitError(f"this student is class-conditional: pass --label (0..{models.mixture.num_classes - 1})")
        if not 0 <= args.label < models.mixture.num_classes:
            raise ToolkitError(f"--label must be in 0..{models.mixture.num_classes - 1}")
        return lambda n: models.conditioner(torch.full((n,), args.label))
    num_classes = getattr(models.conditioner, "num_classes", None)
    if num_classes is not None:  # class-conditional diffusers teacher (UNet2DModel, e.g. the digits)
        if args.label is None or not 0 <= args.label < num_classes:
            raise ToolkitError(f"this student is class-conditional: pass --label (0..{num_classes - 1})")
        return lambda n: models.conditioner(torch.full((n,), args.label))
    if args.prompt is None:
        raise ToolkitError("text-to-image students need --prompt")
    return lambda n: models.conditioner([args.prompt] * n)


def cmd_export(args: argparse.Namespace) -> int:
    from distill.models import export

    config, models = load_run(args.run, use_ema=not args.no_ema)
    if models.pipeline is None:
        raise ToolkitError("export needs a diffusers teacher (sdxl / sd15); toy students are sampled with "
                           "`distill sample`")
    out = export.export_student(models, config, args.out)
    print(f"exported to {out}")
    return 0
