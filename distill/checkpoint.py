"""Atomic checkpoints: write everything into a temporary folder, fsync, then rename it into place.

A checkpoint is a folder ``RUN/checkpoints/step_00001000/`` holding

* ``<name>.safetensors`` -- weights of each trained module (and EMA / method state),
* ``training_state.pt`` -- optimiser and LR-scheduler states, RNG states,
* ``state.json`` -- step, data position, counters, and the size and sha256 of every other file in the
  folder (``files``); written last, so its presence marks a complete folder.

Under FSDP (``train.parallel: fsdp``) the weights, EMA and optimiser states are instead one sharded
``torch.distributed.checkpoint`` (DCP) folder ``dcp/`` that every process writes its shards into
(``.metadata`` + one ``__<rank>_0.distcp`` per process); ``training_state.pt`` then holds the schedulers and
every process's RNG state. The same temporary folder, manifest and rename make it atomic; DCP reshards at
load, so any number of processes resumes it, and :func:`load_checkpoint` reads it as full tensors
(``distill export``).

A process killed while writing leaves only a ``.tmp-*`` folder, which is ignored (and cleaned up later),
so the previous checkpoint stays loadable. Only the last ``keep`` checkpoints are kept. A checkpoint
damaged afterwards (a truncated copy, a full disk, bit rot) fails :func:`verify_checkpoint`;
``resolve_resume("auto")`` and :func:`newest_intact` then warn in one line and use the newest intact one.
Hashing costs one extra read of the checkpoint (~1-2 GB/s) at save and at load.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.models.errors import ToolkitError

_STEP_DIR = re.compile(r"^step_(\d+)$")
#: the sharded DCP state's sub-folder of a checkpoint written under FSDP
DCP_DIR = "dcp"
#: RUN/checkpoints/warm_start/step_*: the regression warm start's progress (distill/warm_start.py); the first
#: training checkpoint supersedes it, and :func:`prune` then deletes it
WARM_START_DIR = "warm_start"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage and non-contiguous views; copy to independent CPU tensors
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def temporary_folder(root: str | Path, step: int, owner_pid: int | None = None) -> Path:
    """Where ``step``'s checkpoint is written before its rename: ``root/.tmp-step_{step}-{pid}``.

    ``owner_pid``: the pid of the process that finishes the checkpoint (rank 0); :func:`prune` keeps the folder
    of a living writer with that pid and deletes other leftovers.
    """
    return Path(root) / f".tmp-step_{step:08d}-{owner_pid if owner_pid is not None else os.getpid()}"


def fresh_folder(path: Path) -> Path:
    """``path`` created empty (a leftover of an earlier attempt with the same name removed)."""
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def save_checkpoint(root: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], training_state: dict,
                    state: dict, keep: int = 3, tmp: Path | None = None) -> Path:
    """Write ``root/step_{step}`` atomically; return its path. ``weights`` maps file stem -> state dict.

    ``tmp``: a :func:`temporary_folder` other processes already wrote into (the sharded ``dcp/`` state under
    FSDP); its files join the manifest and the rename. Default: a fresh one of this process.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    if tmp is None:
        tmp = fresh_folder(temporary_folder(root, step))
    for name, tensors in weights.items():
        save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"))
    torch.save(training_state, tmp / "training_state.pt")
    files = manifest(tmp)  # every file written so far; state.json (last) records them
    with open(tmp / "state.json", "w") as f:
        json.dump({**state, "step": step, "files": files}, f, indent=1)
    for file in tmp.rglob("*"):
        if not file.is_file():
            continue
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. a final save right after a periodic one)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and (path / "state.json").is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted writes."""
    checkpoints = list_checkpoints(root)
    for old in checkpoints[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    if checkpoints and (root / WARM_START_DIR).is_dir():
        shutil.rmtree(root / WARM_START_DIR, ignore_errors=True)
    for leftover in root.glob(".tmp-step_*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(leftover, ignore_errors=True)


# ---------------------------------------------------------------------- integrity
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(folder: str | Path) -> dict[str, dict]:
    """``{relative path: {"size": bytes, "sha256": hex}}`` of every file under ``folder`` except state.json."""
    folder = Path(folder)
    return {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "state.json"}


# folder -> (name, size, mtime) of its files when last verified in this process: the Trainer re-resolves the
# checkpoint that ``distill train`` resolved, and hashing it twice would double the cost of a resume
_VERIFIED: dict[Path, tuple] = {}


def _fingerprint(path: Path) -> tuple:
    return tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(path.rglob("*")) if f.is_file())


def verify_checkpoint(path: str | Path) -> str | None:
    """None when the checkpoint at ``path`` is intact, else a short reason (first damaged file).

    Checks that ``state.json`` parses and every file it lists has its recorded size and sha256.
    Checkpoints written before hashes were recorded (no ``files`` key) are checked for parsing only.
    """
    path = Path(path)
    try:
        key = _fingerprint(path)
        if _VERIFIED.get(path) == key:
            return None
        state = json.loads((path / "state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"state.json unreadable ({type(err).__name__})"
    for name, meta in (state.get("files") or {}).items():
        file = path / name
        if not file.is_file():
            return f"{name} missing"
        size = file.stat().st_size
        if size != meta["size"]:
            return f"{name} has {size} bytes, expected {meta['size']}"
        if _sha256(file) != meta["sha256"]:
            return f"{name} sha256 mismatch"
    _VERIFIED[path] = key
    return None


def _warn(message: str) -> None:
    """One warning line, from the main process only (every process resolves the same checkpoint)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def newest_intact(root: str | Path) -> Path | None:
    """The newest checkpoint under ``root`` that passes :func:`verify_checkpoint`, warning about each damaged
    newer one; None when there is none at all; ToolkitError naming them when all are damaged."""
    found = list_checkpoints(root)
    damaged = []
    for path in reversed(found):
        problem = verify_checkpoint(path)
        if problem is None:
            if damaged:
                _warn(f"checkpoint {damaged[-1][0]} is damaged ({damaged[-1][1]}); using {path}" if len(damaged) == 1
                      else f"{len(damaged)} newest checkpoints are damaged "
                           f"({'; '.join(f'{p.name}: {why}' for p, why in damaged)}); using {path}")
            return path
        damaged.append((path, problem))
    if damaged:
        raise ToolkitError(f"every checkpoint in {root} is damaged: "
                           + "; ".join(f"{p.name}: {why}" for p, why in damaged))
    return None


def resolve_resume(resume: str | Path | None, root: str | Path) -> Path | None:
    """``None``/``"none"``: start fresh; ``"auto"``: the newest intact checkpoint under root (or none); a path
    (a ``step_*`` folder, which must be intact, or a run / checkpoints folder: its newest intact one)."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        return newest_intact(root)
    path = Path(resume)
    if path.is_dir() and not (path / "state.json").is_file():
        for folder in (path / "checkpoints", path):
            if list_checkpoints(folder):
                return newest_intact(folder)
    if not (path / "state.json").is_file():
        raise ToolkitError(f"no complete checkpoint at {path} (expected a step_* folder with state.json)")
    problem = verify_checkpoint(path)
    if problem is not None:
        raise ToolkitError(f"checkpoint {path} is damaged ({problem}); pass another one or --resume auto")
    return path


def is_dcp_checkpoint(path: str | Path) -> bool:
    """True for a checkpoint written under FSDP (sharded DCP state in ``dcp/``)."""
    return (Path(path) / DCP_DIR / ".metadata").is_file()


def read_sharded_full(path: str | Path, keys: set[str] | None = None) -> dict:
    """The sharded DCP state of checkpoint ``path`` as full CPU tensors in this one process (no collective):
    ``{"weights": {stem: {name: tensor}}, "optimizers": {name: optimizer state dict}}``, only ``keys`` if given.

    Uses DCP's own full-read path (as ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` does).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict = {}
    _load_state_dict(state, storage_reader=FileSystemReader(str(Path(path) / DCP_DIR)),
                     planner=_EmptyStateDictLoadPlanner(keys=keys), no_dist=True)
    return state


def load_checkpoint(path: str | Path, optimizers: bool = True) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Return (weights by file stem, training_state, state), as full CPU tensors whatever wrote them.

    ``optimizers=False`` skips reading a sharded checkpoint's optimiser states (twice the weights; an export
    needs none of them).
    """
    path = Path(path)
    weights = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    if is_dcp_checkpoint(path):
        full = read_sharded_full(path, {"weights", "optimizers"} if optimizers else {"weights"})
        weights.update(full["weights"])
        if optimizers:
            training_state["optimizers"] = full["optimizers"]
    with open(path / "state.json") as f:
        state = json.load(f)
    return weights, training_state, state
