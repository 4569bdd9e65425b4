"""Shared helpers of the robustness tests (tests/test_robust_*.py): a tiny toy DMD2 run and file snapshots."""
from __future__ import annotations

from pathlib import Path

import torch

from distill import checkpoint as ckpt

RECIPE = str(Path(__file__).resolve().parent / "recipes" / "toy_dmd2_frozen.yaml")
# 4 steps of a tiny toy DMD2, a checkpoint every 2 steps, no time-based checkpoints (tests decide those)
TINY = ["student.net.hidden=16", "fake_score.net.hidden=16", "data.batch_size=16", "method.generator_every=2",
        "train.log_every=1", "train.checkpoint_every=2", "train.checkpoint_minutes=0", "train.steps=4",
        "train.ema_decay=0.9"]


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and mtime: equal snapshots mean nothing was written."""
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def final_weights(run: Path) -> dict:
    found = ckpt.list_checkpoints(Path(run) / "checkpoints")
    assert found, f"no checkpoint in {run}"
    return ckpt.load_checkpoint(found[-1])


def assert_same_weights(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for group, tensors in a.items():
        assert set(tensors) == set(b[group]), group
        for name, value in tensors.items():
            assert torch.equal(value, b[group][name]), f"{group}.{name} differs"
