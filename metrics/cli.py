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

from distill.metrics._util import check_int, default_workers
from distill.metrics.clip_score import CONVENTIONS, DEFAULT_MODEL, DEFAULT_PRETRAINED, clip_score
from distill.metrics.fid import compute_stats, fid
from distill.metrics.inception import INCEPTION_ENV, INCEPTION_FILENAME


def register(subparsers: argparse._SubParsersAction) -> None:
    from distill.metrics import eval_cli

    eval_cli.register(subparsers)  # distill eval
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


def run_fid(args: argparse.Namespace) -> int:
    check_options(args)
    with _one_line_warnings():
        value = fid(args.a, args.b, **_fid_kwargs(args))
    _report(args, {"fid": value, "a": args.a, "b": args.b}, f"FID: {value:.6f}")
    return 0


def run_fid_stats(args: argparse.Namespace) -> int:
    check_options(args)
    with _one_line_warnings():
        stats = compute_stats(args.folder, **_fid_kwargs(args))
    path = stats.save(args.out)
    _report(args, {"out": str(path), "n": stats.n, "dim": stats.dim}, f"saved {stats.n} x {stats.dim}-d statistics to {path}")
    return 0


def run_clip(args: argparse.Namespace) -> int:
    check_options(args)
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


def check_options(args: argparse.Namespace) -> None:
    """Numeric options, named as on the command line, checked before any input is read or network loaded."""
    check_int(args.batch_size, "--batch-size", 1)
    check_int(args.workers, "--workers", 0, optional=True)


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
