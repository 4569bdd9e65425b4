"""``distill eval MODEL --prompts FILE --ref STATS_OR_FOLDER``: generate, score, write metrics.json.

Class-conditional pixel students (the digits) take ``--labels`` instead of ``--prompts`` (default: every
class) and, for the digits teacher, score in the digits classifier's features against ``--ref
sklearn-digits`` (:mod:`metrics.eval_labels`, :mod:`metrics.eval_digits`).

Everything a user can get wrong (paths, metric names, numeric options) is checked before a network
loads. Under ``torchrun`` / ``accelerate launch`` each process makes its share of the images.
"""
from __future__ import annotations

import argparse
import json

from distill.metrics._util import check_int
from distill.metrics.clip_score import CONVENTIONS, DMD2_PREFIX
from distill.metrics.eval import BASE_METRICS, load_extractor_spec
from distill.metrics.inception import INCEPTION_ENV
from distill.models.errors import ToolkitError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="generate N images from a student and compute FID, CLIP, FD-DINOv2, precision/recall, diversity",
        description="Generate N images (image i: prompt i mod P, or label i mod L, seed SEED+i) from a run folder, "
                    "an exported pipeline folder or a cached Hub id, score them against a reference, and write "
                    "OUT/metrics.json and OUT/grid.png. Reference statistics of a folder are cached.")
    p.add_argument("model", help="run folder (distill train --out), exported pipeline folder, or cached Hub id")
    p.add_argument("--prompts", default=None, help="text file, one prompt per line (text-to-image students)")
    p.add_argument("--labels", default=None, metavar="SPEC_OR_FILE",
                   help="class-conditional students: labels such as 0-9 or 0,3,5-7, or a file of them "
                        "(default: every class, so images are uniform over the classes)")
    p.add_argument("--ref", nargs="+", default=None,
                   help="reference image folder (all metrics), sklearn-digits (the 1,797 real digits), or "
                        "statistics .npz file(s) (Frechet metrics only)")
    p.add_argument("--n", type=int, default=None, help="images to generate (default: one per prompt or label)")
    p.add_argument("--steps", type=int, default=None, help="use the first K of the student's timesteps")
    p.add_argument("--metrics", default=None,
                   help=f"comma-separated: {', '.join(BASE_METRICS)}, fd_<extractor> (default fid,clip; fid for "
                        f"class-conditional students)")
    p.add_argument("--out", default="eval", help="output folder (metrics.json, grid.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0 (image i uses seed + i)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated per batch per process")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="override the card's guidance (>= 0; above 1: classifier-free guidance)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="pipelines: weights dtype (float16 VAEs can overflow to NaN: an error, never a number)")
    p.add_argument("--save-images", action="store_true", help="also write OUT/images/00000.png, ...")
    p.add_argument("--inception", metavar="PATH", help=f"inception-2015-12-05.pt or its folder (else ${INCEPTION_ENV})")
    p.add_argument("--dinov2", metavar="FOLDER", help="facebook/dinov2-large folder (else $DISTILL_DINOV2_PATH)")
    p.add_argument("--extractor", action="append", default=[], metavar="NAME=module:function",
                   help="register a feature extractor; adds the metric fd_NAME (repeatable)")
    p.add_argument("--features", default=None,
                   help="extractor behind fid and kid, and the default of --pr-features / --diversity-features "
                        "(default inception; digits for students of the digits teacher)")
    p.add_argument("--pr-features", default=None,
                   help="extractor for precision/recall (inception, dinov2, digits, ...; default: --features)")
    p.add_argument("--pr-k", type=int, default=3, help="precision/recall neighbourhood (default 3)")
    p.add_argument("--diversity-features", default=None, help="extractor for diversity (default: --features)")
    p.add_argument("--clip-model", default=None, help="OpenCLIP model or local-dir:FOLDER (default ViT-g-14)")
    p.add_argument("--clip-pretrained", default=None, help="CLIP weights tag or file")
    p.add_argument("--clip-convention", choices=CONVENTIONS, default="cosine")
    p.add_argument("--clip-prefix", default="", help=f'caption prefix, e.g. "{DMD2_PREFIX}" (DMD2)')
    p.add_argument("--cache", default="default", help="reference statistics cache folder, or 'none'")
    p.add_argument("--ref-batch-size", type=int, default=64, help="images per batch of the reference pass")
    p.add_argument("--workers", type=int, default=None, help="image decoding processes of the reference pass")
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: this process's accelerator device)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print metrics as one JSON line")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from distill.metrics.cli import _one_line_warnings
    from distill.metrics.eval import Evaluator
    from distill.metrics.eval_loop import evaluate_model, process_group, shard_batches
    from distill.metrics.eval_models import check_model, open_model

    # everything checkable without a network, first
    _check_numbers(args)
    kind = check_model(args.model)
    conditions, labels_info, classes = _conditions(args, kind)
    for spec in args.extractor:
        load_extractor_spec(spec)
    default_metrics = "fid" if classes else "fid,clip"
    metric_names = [m.strip() for m in (args.metrics or default_metrics).split(",") if m.strip()]
    what = "labels" if classes else "prompts"
    n = args.n or len(conditions)
    if "clip" in metric_names and classes:
        raise ToolkitError("clip scores images against prompts; this student is class-conditional (labels): "
                           "drop clip from --metrics")
    features = args.features or ("digits" if classes and classes.digits else "inception")
    if "accuracy" in metric_names and not (classes and features == "digits"):
        raise ToolkitError("accuracy (class accuracy) needs a class-conditional digits student and --features digits")
    groups = len(set(conditions)) if classes else len(conditions)
    if "diversity" in metric_names and n <= groups:
        raise ToolkitError(f"diversity compares images of the same {what[:-1]}: --n ({n}) must exceed the number of "
                           f"{what} ({groups}), e.g. --n {4 * groups} for 4 seeds per {what[:-1]}")
    if "pr" in metric_names and n <= args.pr_k:
        raise ToolkitError(f"precision/recall with --pr-k {args.pr_k} need more than {args.pr_k} images: raise --n")
    device = _launch_device(args.device)
    rank, world = process_group()
    shard_batches(n, args.batch_size, rank, world)  # enough batches for every process, before any loading
    with _one_line_warnings():
        evaluator = Evaluator(
            metric_names, args.ref, inception=args.inception, dinov2=args.dinov2, fid_features=features,
            pr_features=args.pr_features or features, diversity_features=args.diversity_features or features,
            pr_k=args.pr_k, clip_name=args.clip_model, clip_pretrained=args.clip_pretrained,
            clip_convention=args.clip_convention, clip_prefix=args.clip_prefix, batch_size=args.ref_batch_size,
            num_workers=args.workers, cache_dir=None if args.cache == "none" else args.cache, device=device,
            progress=not args.no_progress)
        if classes:
            from distill.metrics.eval_labels import open_class_model

            generate, info = open_class_model(args.model, kind, steps=args.steps, device=device,
                                              guidance_scale=args.guidance_scale)
            result = evaluate_model(generate, evaluator, None, labels=conditions, labels_info=labels_info, n=n,
                                    seed=args.seed, batch_size=args.batch_size, out_dir=args.out,
                                    save_images=args.save_images, model_info=info, progress=not args.no_progress)
        else:
            generate, info = open_model(args.model, steps=args.steps, device=device,
                                        guidance_scale=args.guidance_scale, dtype=args.dtype)
            result = evaluate_model(generate, evaluator, conditions, n=n, seed=args.seed,
                                    batch_size=args.batch_size, out_dir=args.out, save_images=args.save_images,
                                    model_info=info, prompts_file=args.prompts, progress=not args.no_progress)
    if rank == 0:
        values = result["metrics"]
        print(json.dumps(values) if args.json else
              "  ".join(f"{k}: {v:.6g}" for k, v in values.items()) + f"  ({args.out}/metrics.json)")
    return 0


def _check_numbers(args: argparse.Namespace) -> None:
    """Every numeric option, named as on the command line, and the output folders (one ``error:`` line, exit 2)."""
    import math

    check_int(args.n, "--n", 2, optional=True)
    check_int(args.steps, "--steps", 1, optional=True)
    check_int(args.batch_size, "--batch-size", 1)
    check_int(args.ref_batch_size, "--ref-batch-size", 1)
    check_int(args.workers, "--workers", 0, optional=True)
    check_int(args.seed, "--seed", 0)
    check_int(args.pr_k, "--pr-k", 1)
    scale = args.guidance_scale
    if scale is not None and not (math.isfinite(scale) and scale >= 0):
        raise ToolkitError(f"--guidance-scale must be a finite number >= 0, got {scale!r}")
    from distill import cli_checks

    cli_checks.device(args.device)
    cli_checks.out_dir(args.out)  # written after the generation: a file here would lose the whole run
    if args.cache not in ("none", "default"):
        cli_checks.out_dir(args.cache, "--cache")


def _conditions(args: argparse.Namespace, kind: str):
    """(prompts or labels, the labels' description, the class-conditional model or None), with ``--steps``
    checked against the student's timesteps; from the model's JSON / YAML files only."""
    from distill.metrics.clip_score import read_prompts
    from distill.metrics.eval_labels import class_model, parse_labels
    from distill.models.cards import subset_timesteps

    classes = class_model(args.model, kind)
    if classes is None:
        if args.labels is not None:
            raise ToolkitError(f"--labels is for class-conditional students; {args.model} is a text-to-image "
                               f"model: pass --prompts FILE")
        if args.prompts is None:
            raise ToolkitError(f"{args.model} is a text-to-image model: pass --prompts FILE")
        timesteps = _text_timesteps(args.model, kind)
        if timesteps is not None:
            subset_timesteps(timesteps, args.steps)
        elif kind == "pipeline" and args.steps is None:
            raise ToolkitError(f"{args.model} has no distill_student.json with the student's timesteps: pass --steps")
        return read_prompts(args.prompts), None, None
    if args.prompts is not None:
        raise ToolkitError(f"{args.model} is class-conditional ({classes.num_classes} classes): pass --labels "
                           f"(e.g. 0-{classes.num_classes - 1}, the default), not --prompts")
    subset_timesteps(classes.timesteps, args.steps)
    labels, info = parse_labels(args.labels, classes.num_classes)
    return labels, info, classes


def _text_timesteps(model: str, kind: str) -> list[int] | None:
    """A text-to-image student's timesteps from its recipe or card (None: a Hub id or a folder without a card)."""
    from pathlib import Path

    if kind == "run":
        from distill.config import load_config

        return [int(t) for t in load_config(Path(model) / "config.yaml").student.timesteps]
    card = Path(model) / "distill_student.json"
    if kind == "pipeline" and card.is_file():
        try:
            return [int(t) for t in json.loads(card.read_text()).get("timesteps") or []] or None
        except (ValueError, TypeError):
            raise ToolkitError(f"{card} is not a valid student card (JSON with the student's timesteps)") from None
    return None


def _launch_device(device: str | None) -> str:
    """Join the torchrun / accelerate process group when launched that way; ``device`` or this process's device."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return device if device is not None and state.num_processes == 1 else str(state.device)
