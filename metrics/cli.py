"""``distill fid``, ``distill fid-stats`` and ``distill clip``: the metrics from a shell.

As in EDM2's metrics tool, reference statistics are made once (``fid-stats``) and compared many
times (``fid``). Every input is checked before a network is loaded; problems print one line.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import warnings

from distill.metrics._util import default_workers
from distill.metrics.clip_score import CONVENTIONS, DEFAULT_MODEL, DEFAULT_PRETRAINED, clip_score
from distill.metrics.fid import compute_stats, fid
from distill.metrics.inception import INCEPTION_ENV, INCEPTION_FILENAME


def register(subparsers: argparse._SubParsersAction) -> None:
    from distill.metrics import eval_cli

    eval_cli.register(subparsers)  # distill eval
    coco = subparsers.add_parser(
        "coco-ref", help="COCO zero-shot protocol: prompts, resized reference images and statistics",
        description="From a COCO captions file (captions_val2014.json, or file_name<TAB>caption lines) and its "
                    "image folder: draw N captioned images (seeded), write OUT/prompts.txt, OUT/images/ (centre "
                    "crop, LANCZOS resize to --resolution), OUT/ref_inception.npz and OUT/coco_protocol.json.")
    coco.add_argument("--captions", required=True, help="captions_val2014.json or a TSV file_name<TAB>caption")
    coco.add_argument("--images", required=True, help="folder of the COCO images (e.g. val2014/)")
    coco.add_argument("--out", required=True, help="output folder")
    coco.add_argument("--n", type=int, default=10000, help="captions / reference images (10000 or 30000)")
    coco.add_argument("--resolution", type=int, default=512, help="reference image size (the eval resolution)")
    coco.add_argument("--seed", type=int, default=0)
    coco.add_argument("--no-stats", action="store_true", help="skip the Inception statistics")
    coco.add_argument("--threads", type=int, default=4, help="resize threads")
    _add_fid_options(coco)
    coco.set_defaults(func=run_coco_ref)
    fid_parser = subparsers.add_parser(
        "fid",
        help="FID between two image folders or .npz statistics (clean-fid 'clean' protocol)",
        description="FID (clean-fid 'clean' mode) between A and B; each an image folder (png, jpg, webp, ...; "
        "recursive) or an .npz of statistics from 'distill fid-stats' or clean-fid.",
    )
    fid_parser.add_argument("a", help="image folder or statistics .npz")
    fid_parser.add_argument("b", help="image folder or statistics .npz")
    _add_fid_options(fid_parser)
    fid_parser.set_defaults(func=run_fid)

    stats_parser = subparsers.add_parser(
        "fid-stats",
        help="save Inception statistics of an image folder as .npz (reference statistics)",
        description="Compute the FID statistics (mu, sigma, n and a manifest) of an image folder.",
    )
    stats_parser.add_argument("folder", help="image folder (recursive)")
    stats_parser.add_argument("--out", required=True, help="output .npz path")
    _add_fid_options(stats_parser)
    stats_parser.set_defaults(func=run_fid_stats)

    clip_parser = subparsers.add_parser(
        "clip",
        help="CLIP score of images against captions (OpenCLIP)",
        description="CLIP score of the images in a folder, sorted by file name, against the captions in a text "
        "file, one per line, in the same order.",
    )
    clip_parser.add_argument("images", help="image folder; images sorted by path are matched to caption lines")
    clip_parser.add_argument("prompts", help="text file, one caption per line")
    clip_parser.add_argument("--model", default=DEFAULT_MODEL, help=f"OpenCLIP model name or local-dir:/folder (default {DEFAULT_MODEL})")
    clip_parser.add_argument(
        "--pretrained", default=DEFAULT_PRETRAINED, help=f"weights tag or local file (default {DEFAULT_PRETRAINED})"
    )
    clip_parser.add_argument(
        "--convention", choices=CONVENTIONS, default="cosine", help="cosine: mean cosine (DMD2); torchmetrics: mean max(100 cos, 0)"
    )
    clip_parser.add_argument("--prefix", default="", help='caption prefix, e.g. "A photo depicts " (DMD2)')
    clip_parser.add_argument("--quickgelu", action="store_true", help="force QuickGELU (OpenAI weights from a local file)")
    _add_run_options(clip_parser, batch_size=32)
    clip_parser.set_defaults(func=run_clip)


def _add_fid_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--inception",
        metavar="PATH",
        help=f"{INCEPTION_FILENAME} or its folder (default ${INCEPTION_ENV}, then clean-fid's download folder)",
    )
    _add_run_options(parser, batch_size=64)


def _add_run_options(parser: argparse.ArgumentParser, batch_size: int) -> None:
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"images per batch (default {batch_size})")
    parser.add_argument("--workers", type=int, default=None, help="image decoding processes (default min(4, CPUs))")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default CUDA when present)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _check_run_options(args: argparse.Namespace) -> None:
    """Numeric options and the device, named as on the command line, checked before any input is read or model
    loaded (one ``error:`` line, exit 2)."""
    from distill import cli_checks

    cli_checks.at_least("--batch-size", args.batch_size, 1)
    cli_checks.at_least("--workers", args.workers, 0)
    cli_checks.device(args.device)


def run_fid(args: argparse.Namespace) -> int:
    _check_run_options(args)
    with _one_line_warnings():
        value = fid(args.a, args.b, **_fid_kwargs(args))
    _report(args, {"fid": value, "a": args.a, "b": args.b}, f"FID: {value:.6f}")
    return 0


def run_fid_stats(args: argparse.Namespace) -> int:
    from distill import cli_checks

    _check_run_options(args)
    cli_checks.out_file(args.out)
    with _one_line_warnings():
        stats = compute_stats(args.folder, **_fid_kwargs(args))
    path = stats.save(args.out)
    _report(args, {"out": str(path), "n": stats.n, "dim": stats.dim}, f"saved {stats.n} x {stats.dim}-d statistics to {path}")
    return 0


def run_clip(args: argparse.Namespace) -> int:
    _check_run_options(args)
    with _one_line_warnings():
        value = clip_score(
            args.images,
            args.prompts,
            model=args.model,
            pretrained=args.pretrained,
            convention=args.convention,
            prefix=args.prefix,
            quick_gelu=True if args.quickgelu else None,
            batch_size=args.batch_size,
            num_workers=default_workers() if args.workers is None else args.workers,
            device=args.device,
            progress=not args.no_progress,
        )
    result = {"clip_score": value, "convention": args.convention, "model": args.model, "pretrained": args.pretrained}
    _report(args, result, f"CLIP score ({args.convention}, {args.model} {args.pretrained}): {value:.6f}")
    return 0


def run_coco_ref(args: argparse.Namespace) -> int:
    from distill import cli_checks
    from distill.metrics._util import check_int
    from distill.metrics.coco import make_coco_reference

    _check_run_options(args)
    for option, value, lo in (("--n", args.n, 2), ("--resolution", args.resolution, 16), ("--seed", args.seed, 0),
                              ("--threads", args.threads, 1)):
        check_int(value, option, lo)  # named as on the command line (the Python API calls --threads workers)
    cli_checks.out_dir(args.out)
    with _one_line_warnings():
        protocol = make_coco_reference(args.captions, args.images, args.out, n=args.n, resolution=args.resolution,
                                       seed=args.seed, workers=args.threads, stats=not args.no_stats,
                                       inception_path=args.inception, device=args.device,
                                       progress=not args.no_progress)
    _report(args, protocol | {"files": len(protocol["files"])},
            f"wrote {protocol['n']} prompts and reference images to {args.out}")
    return 0


def _fid_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        inception_path=args.inception,
        batch_size=args.batch_size,
        num_workers=args.workers,
        device=args.device,
        progress=not args.no_progress,
    )


def _report(args: argparse.Namespace, result: dict, text: str) -> None:
    print(json.dumps(result) if args.json else text)


@contextlib.contextmanager
def _one_line_warnings():
    """Print warnings as ``warning: ...`` lines on stderr instead of Python's two-line format."""

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield
