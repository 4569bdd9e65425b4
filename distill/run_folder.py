"""A run folder belongs to one recipe.

``distill train --out RUN`` checks, before it writes anything, that ``RUN`` may be used with the new
config (:func:`check_run_folder`):

* a folder holding checkpoints (training or warm start) is resumed only with the recipe it was started
  with, up to the keys in ``RESUMABLE_KEYS`` (how long to train, how often to log / checkpoint / sample);
  any other difference is one error naming the keys;
* ``--resume none`` into a folder with checkpoints is an error unless ``--overwrite`` is given, which
  deletes the run's files (:func:`clear_run`) and starts over;
* a folder without checkpoints (a start that failed before its first save) holds nothing to protect.

``RUN/config.yaml`` is written atomically and only after these checks pass (:func:`write_config`).
"""
from __future__ import annotations

import shutil
from pathlib import Path

from distill import checkpoint as ckpt
from distill.models.errors import ToolkitError

#: keys that may differ between a run's saved config and the config it is resumed with
RESUMABLE_KEYS = (
    "train.steps", "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
    "train.keep_checkpoints", "train.sample_every", "train.sample_count", "train.max_nan_steps",
)
#: what ``--overwrite`` deletes: everything ``distill train`` writes into a run folder
RUN_FILES = ("checkpoints", "log.jsonl", "samples", "tensorboard", "config.yaml")


def has_checkpoints(run: Path) -> bool:
    """Any checkpoint folder (complete or not, training or warm start) under ``run/checkpoints``."""
    root = Path(run) / "checkpoints"
    return any(root.glob("step_*")) or any((root / ckpt.WARM_START_DIR).glob("step_*"))


def _flat(data, prefix: str = "") -> dict:
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(data) if isinstance(data, tuple) else data}


def _resolved(config) -> dict:
    """The config as a flat dict, with the method section filled in with its defaults."""
    import dataclasses

    from distill.build import method_config

    data = config.to_dict()
    data["method"] = {"name": config.method["name"], **dataclasses.asdict(method_config(config))}
    return _flat(data)


def config_differences(saved, new) -> dict[str, tuple]:
    """``{dotted key: (saved value, new value)}`` where two :class:`~distill.config.Config` objects differ.

    A different method is one difference (``method.name``), not one per option of the two methods.
    """
    a, b = _resolved(saved), _resolved(new)
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    if "method.name" in keys:
        keys = [k for k in keys if not k.startswith("method.") or k == "method.name"]
    return {k: (a.get(k, "<unset>"), b.get(k, "<unset>")) for k in keys}


def _saved_config(run: Path):
    from distill.config import load_config

    path = run / "config.yaml"
    if not path.is_file():
        return None
    try:
        return load_config(path)
    except ToolkitError as err:
        raise ToolkitError(f"{path} cannot be read ({err}); this run folder cannot be resumed") from None


def check_run_folder(run: str | Path, config, resume: str, overwrite: bool = False) -> None:
    """Refuse (ToolkitError) to use ``run`` with ``config``; writes nothing. See the module docstring."""
    run = Path(run)
    fresh = resume in (None, "", "none", "never") or overwrite
    if fresh:
        if has_checkpoints(run) and not overwrite:
            raise ToolkitError(f"{run} already holds checkpoints; pass --resume auto to continue that run, or "
                               f"--overwrite to delete its files and start over")
        return
    sources = [run]
    if resume != "auto":  # a checkpoint of another run: it must come from the same recipe too
        path = Path(resume).absolute()
        sources += [p for p in (path.parent.parent, path.parent, path) if (p / "config.yaml").is_file()][:1]
    for source in sources:
        if source == run and not has_checkpoints(run):
            continue
        saved = _saved_config(source)
        if saved is None:
            continue
        changed = {k: v for k, v in config_differences(saved, config).items() if k not in RESUMABLE_KEYS}
        if changed:
            shown = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:6])
            shown += f" and {len(changed) - 6} more" if len(changed) > 6 else ""
            raise ToolkitError(f"{source} was trained with a different recipe ({shown}); resuming may "
                               f"change only {', '.join(RESUMABLE_KEYS)} -- use a "
                               f"new --out folder, or --overwrite to start over")


def clear_run(run: str | Path) -> None:
    """Delete what ``distill train`` wrote into ``run`` (``--overwrite``); other files are left alone."""
    run = Path(run)
    for name in RUN_FILES:
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def write_config(config, run: str | Path) -> None:
    """Write ``run/config.yaml`` atomically, creating the folder."""
    from distill.config import save_config

    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    save_config(config, run / "config.yaml")
