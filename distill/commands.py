"""``distill train``, ``distill sample`` and ``distill export``."""
from __future__ import annotations

import argparse
import sys
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
    p.add_argument("--resume", default="auto", help="auto (default: newest intact checkpoint in --out), none, or a "
                                                    "path; a run folder is resumed only with its own recipe")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in an --out folder that holds checkpoints: delete its checkpoints, log, "
                        "samples and config.yaml first (implies --resume none)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("overrides", nargs="*", default=[], help="key=value overrides")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("sample", help="sample from a trained student")
    p.add_argument("run", help="run folder written by `distill train`, or a folder written by `distill export`")
    p.add_argument("--n", type=int, default=16, help="number of samples")
    p.add_argument("--out", required=True, help=".npy file (vector data) or folder of PNGs (images)")
    p.add_argument("--steps", type=int, default=None,
                   help="use the first K of the student's timesteps (default: all of them)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label", type=int, default=None, help="class label (class-conditional students)")
    p.add_argument("--prompt", default=None, help="prompt (text-to-image students), repeated --n times")
    p.add_argument("--prompts", default=None,
                   help="prompt file (.txt, .jsonl, .csv, .parquet): one image per prompt, written to OUT/images/ "
                        "with OUT/prompts.txt and OUT/grid.png")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even if an EMA exists")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default=None, help="where to run (default: this process's GPU if any, else cpu)")
    p.set_defaults(func=cmd_sample)

    p = subparsers.add_parser("export", help="export a trained student to a diffusers folder or LoRA weights")
    p.add_argument("run", help="run folder written by `distill train`")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--device", default=None, help="where to rebuild the student (default: GPU if any, else cpu)")
    p.add_argument("--format", default=None, choices=["pipeline", "unet", "lora"],
                   help="pipeline (default for full students), unet, or lora (default for LoRA students)")
    p.set_defaults(func=cmd_export)


def cmd_train(args: argparse.Namespace) -> int:
    """Checks first (options, recipe, run folder), writes nothing until they pass; see distill/run_folder.py.

    SIGINT / SIGTERM save a checkpoint at the next step boundary and exit with 128 + signal (130 / 143).
    """
    import os

    from distill import checkpoint as ckpt
    from distill import cli_checks, interrupt, run_folder
    from distill.build import build_run
    from distill.config import load_config
    from distill.config_rules import check_world
    from distill.engine import Trainer
    from distill.sample_grids import sample_grid_writer
    from distill.train_eval import build_eval_fn

    out = cli_checks.out_dir(args.out)
    config = load_config(args.config, args.overrides)
    check_world(config, int(os.environ.get("WORLD_SIZE", "1")))  # torchrun / accelerate set it before we start
    make_eval_fn = build_eval_fn(config)  # checks train.eval.* before any slow work
    overwrite = getattr(args, "overwrite", False)
    resume = "none" if overwrite else args.resume
    run_folder.check_run_folder(out, config, args.resume, overwrite)
    from distill.parallel import make_accelerator, validate_run_config

    # the Accelerator first: it knows this process's device (cuda:LOCAL_RANK), and everything is built there
    accelerator = make_accelerator(config.train)
    validate_run_config(config, accelerator.num_processes, accelerator.device.type)
    main = accelerator.is_main_process  # every process runs this; one writes the run's files
    if overwrite and main:
        run_folder.clear_run(out)
    accelerator.wait_for_everyone()
    resume_from = ckpt.resolve_resume(resume, out / "checkpoints")
    if resume_from is None and main:  # a new run: its recipe is recorded before the first save
        run_folder.write_config(config, out)
    interrupt.install()
    try:
        models, method, data = build_run(config, device=accelerator.device, warm_start=resume_from is None,
                                         progress=not args.no_progress and main, run_dir=out)
        trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, out,
                          resume=resume_from, accelerator=accelerator, sample_fn=sample_grid_writer(models, config),
                          progress=not args.no_progress, eval_fn=make_eval_fn(models) if make_eval_fn else None)
        if trainer.resumed_from is not None:
            if main:  # the resumable keys (train.steps, ...) may have changed: record the new values
                run_folder.write_config(config, out)
            print(f"resuming from {trainer.resumed_from}")
        logs = trainer.run()
    except interrupt.Interrupted as stop:
        if main:
            print(f"{stop}; run the same command again to continue (--resume auto)", file=sys.stderr)
        return stop.exit_code
    finally:
        interrupt.uninstall()
    if trainer.accelerator.is_main_process:
        summary = ", ".join(f"{k}={v:.4g}" for k, v in logs.items() if "loss" in k)
        print(f"done: {trainer.step} steps, checkpoints in {trainer.checkpoint_root}; {summary}")
    return 0


def load_run(run: str | Path, use_ema: bool = True, device=None):
    """Rebuild the models of a run on ``device`` (default: GPU if any) and load its latest student weights.

    Returns (config, models)."""
    from distill import checkpoint as ckpt
    from distill.build import build_models, method_class
    from distill.config import load_config

    run = Path(run)
    if not (run / "config.yaml").is_file():
        raise ToolkitError(f"{run} is not a run folder (no config.yaml); pass the --out folder of `distill train`")
    config = load_config(run / "config.yaml")
    newest = ckpt.newest_intact(run / "checkpoints")  # warns about damaged newer ones; errors when all are
    if newest is None:
        raise ToolkitError(f"no checkpoint in {run / 'checkpoints'}; train first")
    from distill.parallel import default_device

    models = build_models(config, need_fake_score=False, device=default_device(device))
    weights, _, _ = ckpt.load_checkpoint(newest, optimizers=False)
    from distill.engine import _load_trainable_state

    key = "student_ema" if use_ema and "student_ema" in weights else "student"
    # the EMA holds parameters only: float buffers (SD3's positional table) come from the raw student
    _load_trainable_state(models.student, {**weights.get("student", {}), **weights[key]})
    models.student.eval()
    method_class(config.method["name"])  # validates the name
    return config, models


def cmd_sample(args: argparse.Namespace) -> int:
    from distill.samplers import sample_student
    from distill.sample_grids import decode_to_images, save_images

    from distill import cli_checks  # options first, before the run is loaded

    for option, value in (("--n", args.n), ("--batch-size", args.batch_size), ("--steps", args.steps)):
        cli_checks.at_least(option, value, 1)
    cli_checks.device(args.device)
    if args.prompts is not None or _is_text_to_image(args.run):
        from distill.sample_text import cmd_sample_text

        cli_checks.out_dir(args.out)
        return cmd_sample_text(args, args.run)
    (cli_checks.out_file if str(args.out).endswith(".npy") else cli_checks.out_dir)(args.out)
    config, models = load_run(args.run, use_ema=not args.no_ema, device=args.device)
    student = models.student
    device = student.timesteps.device
    timesteps = student.timesteps if args.steps is None else student.timesteps[:args.steps]
    if args.steps is not None and not 1 <= args.steps <= student.num_steps:
        raise ToolkitError(f"--steps must be between 1 and {student.num_steps} (the student's timesteps)")
    cond = _sample_cond(models, args)
    g = torch.Generator().manual_seed(args.seed)
    chunks = []
    for start in range(0, args.n, args.batch_size):
        n = min(args.batch_size, args.n - start)
        # noise drawn on the CPU generator, then moved: the same seed gives the same samples on every device
        z = torch.randn(n, *models.sample_shape, generator=g).to(device)
        c = cond(n).to(device) if cond is not None else None
        chunks.append(sample_student(student, z, c, timesteps, generator=g).float().cpu())
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


def _is_text_to_image(folder: str) -> bool:
    """An exported text-to-image folder (a student card of a prompt-conditioned kind) or a run trained on prompts
    (class-conditional pixel students, ``data.kind: labels``, sample with ``--label``)."""
    import json

    from distill.models.cards import STUDENT_CARD

    folder = Path(folder)
    if (folder / STUDENT_CARD).is_file():
        return json.loads((folder / STUDENT_CARD).read_text()).get("kind") != "unet2d"
    if not (folder / "config.yaml").is_file():
        return False
    from distill.config import load_config

    return load_config(folder / "config.yaml").data.kind == "prompts"


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
    from distill import cli_checks
    from distill.models import export

    cli_checks.out_dir(args.out)  # before the run is loaded
    cli_checks.device(args.device)
    _check_export_format(args.run, args.format)
    config, models = load_run(args.run, use_ema=not args.no_ema, device=args.device)
    if models.pipeline is None:
        raise ToolkitError("export needs a diffusers teacher (sdxl / sd15); toy students are sampled with "
                           "`distill sample`")
    from distill.models.backbones.common import FlowComponents, export_flow_student

    if isinstance(models.pipeline, FlowComponents):  # SD3 / FLUX / Sana: the adapter's own pipeline and scheduler
        out = export_flow_student(models, config, args.out)
    else:
        out = export.export_student(models, config, args.out, fmt=args.format)
    print(f"exported to {out}")
    return 0


def _check_export_format(run: str, fmt: str | None) -> None:
    """``--format lora`` needs a LoRA student: checked from the run's config before any model loads."""
    if fmt != "lora" or not (Path(run) / "config.yaml").is_file():
        return
    from distill.config import load_config

    if load_config(Path(run) / "config.yaml").student.lora is None:
        raise ToolkitError("--format lora needs a LoRA student (student.lora in the recipe); this student is a "
                           "full UNet: use --format pipeline or unet")
