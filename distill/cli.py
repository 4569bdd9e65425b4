"""The ``distill`` console script.

Each command lives in its own module that exposes ``register(subparsers)``; this file only
collects them, so a new command needs no edit here beyond one line in ``COMMAND_MODULES``.
Errors a user can fix (:class:`models.errors.ToolkitError`) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from distill.models.errors import ToolkitError

# Modules that register subcommands. Imported lazily so `distill --help` stays fast.
COMMAND_MODULES = [
    "distill.commands",  # train, sample, export
    "distill.metrics.cli",  # fid, fid-stats, clip
    "distill.plan",  # plan

    "distill.encode",  # encode-prompts, encode-latents

    "distill.demo",  # demo, pretrain-demo-teacher (sklearn digits)
]


class _Parser(argparse.ArgumentParser):
    """argparse's own refusals (``--n abc``, a missing required option) as one ``error:`` line and exit 2, like every
    other user error, instead of a usage block; subcommand parsers inherit this class."""

    def error(self, message: str):
        raise ToolkitError(f"{self.prog}: {message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="distill", description="Distil diffusion models into one-step generators and evaluate them."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:  # a command module not written yet must not break the others
            if err.name != name:
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        # argparse cannot take positionals (the key=value overrides of `train`) after options such as --out:
        # collect such leftovers into the command's ``overrides`` instead of rejecting them
        args, extra = parser.parse_known_args(argv)
        if extra:
            takes_overrides = isinstance(getattr(args, "overrides", None), list)
            options = [e for e in extra if e.startswith("-")]
            if not takes_overrides or options:
                parser.error(f"unrecognized arguments: {' '.join(options or extra)}")
            malformed = [e for e in extra if "=" not in e]
            if malformed:  # e.g. `train.parallel` alone: name the form, and the command that wanted it
                raise ToolkitError(f"distill {args.command}: overrides are key=value pairs, got {' '.join(malformed)!r}"
                                   f" (e.g. train.steps=100)")
            args.overrides = [*args.overrides, *extra]  # a new list: never extend argparse's default
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except ToolkitError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
