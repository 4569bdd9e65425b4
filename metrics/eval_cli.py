"""``distill eval MODEL --prompts FILE --ref STATS_OR_FOLDER``: generate, score, write metrics.json.

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
        description="Generate N images (image i: prompt i mod P, seed SEED+i) from a run folder, an exported "
                    "pipeline folder or a cached Hub id, score them against a reference, and write OUT/metrics.json "
                    "and OUT/grid.png. Reference statistics of a folder are cached.")
    p.add_argument("model", help="run folder (distill train --out), exported pipeline folder, or cached Hub id")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line")
    p.add_argument("--ref", nargs="+", default=None,
                   help="reference image folder (all metrics), or statistics .npz file(s) (Frechet metrics only)")
    p.add_argument("--n", type=int, default=None, help="images to generate (default: one per prompt)")
    p.add_argument("--steps", type=int, default=None, help="use the first K of the student's timesteps")
    p.add_argument("--metrics", default="fid,clip",
                   help=f"comma-separated: {', '.join(BASE_METRICS)}, fd_<extractor> (default fid,clip)")
    p.add_argument("--out", default="eval", help="output folder (metrics.json, grid.png)")
    p.add_argument("--seed", type=int, default=0, help="seed of image 0 (image i uses seed + i)")
    p.add_argument("--batch-size", type=int, default=16, help="images generated per batch per process")
    p.add_argument("--guidance-scale", type=float, default=None, help="pipelines: override the card's guidance")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="pipelines: weights dtype (float16 VAEs can overflow to NaN: an error, never a number)")
    p.add_argument("--save-images", action="store_true", help="also write OUT/images/00000.png, ...")
    p.add_argument("--inception", metavar="PATH", help=f"inception-2015-12-05.pt or its folder (else ${INCEPTION_ENV})")
    p.add_argument("--dinov2", metavar="FOLDER", help="facebook/dinov2-large folder (else $DISTILL_DINOV2_PATH)")
    p.add_argument("--extractor", action="append", default=[], metavar="NAME=module:function",
                   help="register a feature extractor; adds the metric fd_NAME (repeatable)")
    p.add_argument("--pr-features", default="inception", help="extractor for precision/recall (inception, dinov2, ...)")
    p.add_argument("--pr-k", type=int, default=3, help="precision/recall neighbourhood (default 3)")
    p.add_argument("--diversity-features", default="inception", help="extractor for diversity")
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
    from distill.metrics.clip_score import read_prompts
    from distill.metrics.cli import _one_line_warnings
    from distill.metrics.eval import Evaluator
    from distill.metrics.eval_loop import evaluate_model, process_group
    from distill.metrics.eval_models import check_model, open_model

    # everything checkable without a network, first
    check_int(args.n, "--n", 2, optional=True)
    check_int(args.steps, "--steps", 1, optional=True)
    check_int(args.batch_size, "--batch-size", 1)
    check_int(args.ref_batch_size, "--ref-batch-size", 1)
    check_int(args.workers, "--workers", 0, optional=True)
    check_int(args.seed, "--seed", 0)
    check_int(args.pr_k, "--pr-k", 1)
    check_model(args.model)
    prompts = read_prompts(args.prompts)
    for spec in args.extractor:
        load_extractor_spec(spec)
    metric_names = [m.strip() for m in args.metrics.split(",") if m.strip()]
    n = args.n or len(prompts)
    if "diversity" in metric_names and n <= len(prompts):
        raise ToolkitError(f"diversity compares images of the same prompt: --n ({n}) must exceed the number of "
                           f"prompts ({len(prompts)}), e.g. --n {4 * len(prompts)} for 4 seeds per prompt")
    device = _launch_device(args.device)
    with _one_line_warnings():
        evaluator = Evaluator(
            metric_names, args.ref, inception=args.inception,
            dinov2=args.dinov2, pr_features=args.pr_features, diversity_features=args.diversity_features,
            pr_k=args.pr_k, clip_name=args.clip_model, clip_pretrained=args.clip_pretrained,
            clip_convention=args.clip_convention, clip_prefix=args.clip_prefix, batch_size=args.ref_batch_size,
            num_workers=args.workers, cache_dir=None if args.cache == "none" else args.cache, device=device,
            progress=not args.no_progress)
        generate, info = open_model(args.model, steps=args.steps, device=device, guidance_scale=args.guidance_scale,
                                    dtype=args.dtype)
        result = evaluate_model(generate, evaluator, prompts, n=n, seed=args.seed,
                                batch_size=args.batch_size, out_dir=args.out, save_images=args.save_images,
                                model_info=info, prompts_file=args.prompts, progress=not args.no_progress)
    if process_group()[0] == 0:
        values = result["metrics"]
        print(json.dumps(values) if args.json else
              "  ".join(f"{k}: {v:.6g}" for k, v in values.items()) + f"  ({args.out}/metrics.json)")
    return 0


def _launch_device(device: str | None) -> str:
    """Join the torchrun / accelerate process group when launched that way; ``device`` or this process's device."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return device if device is not None and state.num_processes == 1 else str(state.device)
