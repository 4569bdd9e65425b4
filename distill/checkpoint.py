"""Atomic checkpoints: write everything into a temporary folder, fsync, then rename it into place.

A checkpoint is a folder ``RUN/checkpoints/step_00001000/`` holding

* ``<name>.safetensors`` -- weights of each trained module (and EMA / method state),
* ``training_state.pt`` -- optimiser and LR-scheduler states, RNG states,
* ``state.json`` -- step, data position, counters; written last, so its presence marks a complete folder.

A process killed while writing leaves only a ``.tmp-*`` folder, which is ignored (and cleaned up later),
so the previous checkpoint stays loadable. Only the last ``keep`` checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.models.errors import ToolkitError

_STEP_DIR = re.compile(r"^step_(\d+)$")


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


def save_checkpoint(root: str | Path, step: int, weights: dict[str, dict[str, torch.Tensor]], training_state: dict,
                    state: dict, keep: int = 3) -> Path:
    """Write ``root/step_{step}`` atomically; return its path. ``weights`` maps file stem -> state dict."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, tensors in weights.items():
        save_file(_contiguous(tensors), str(tmp / f"{name}.safetensors"))
    torch.save(training_state, tmp / "training_state.pt")
    with open(tmp / "state.json", "w") as f:
        json.dump({**state, "step": step}, f, indent=1)
    for file in tmp.iterdir():
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
    for leftover in root.glob(".tmp-step_*"):
        pid = leftover.name.rsplit("-", 1)[-1]
        if pid != str(os.getpid()):
            shutil.rmtree(leftover, ignore_errors=True)


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """``None``/``"none"``: start fresh; ``"auto"``: the newest complete checkpoint under root (or none); a path."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        found = list_checkpoints(root)
        return found[-1] if found else None
    path = Path(resume)
    if path.is_dir() and not (path / "state.json").is_file():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if found:
            return found[-1]
    if not (path / "state.json").is_file():
        raise ToolkitError(f"no complete checkpoint at {path} (expected a step_* folder with state.json)")
    return path


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict, dict]:
    """Return (weights by file stem, training_state, state)."""
    path = Path(path)
    weights = {f.stem: load_file(str(f)) for f in sorted(path.glob("*.safetensors"))}
    training_state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=False)
    with open(path / "state.json") as f:
        state = json.load(f)
    return weights, training_state, state
