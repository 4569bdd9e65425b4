"""The regression warm start on N processes: each regresses its rows of the global batch, gradients are summed,
and the student is the one a single process would warm-start (4-step toy student, rows chosen per step)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from distill import checkpoint as ckpt
from distill.build import build_models
from distill.cli import main
from distill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPE = str(ROOT / "recipes" / "toy_ring8_dmd2_4step.yaml")
# one training step at a negligible learning rate: recipes need steps >= 1, and the checkpoint it writes holds
# the warm-started student unchanged (to ~1e-30)
ARGS = ["train.steps=1", "generator_optim.lr=1e-30", "generator_optim.warmup_steps=0", "student.warm_start.steps=5", "student.warm_start.pairs=0", "student.warm_start.ode_steps=5",
        "data.batch_size=8", "student.net.hidden=32", "fake_score.net.hidden=32", "train.log_every=0"]


def _student(run: Path) -> dict:
    weights, _, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1])
    return weights["student"]


@pytest.mark.slow
def test_two_processes_warm_start_like_one(tmp_path, torch_single_thread):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "distill.cli", "train", RECIPE, "--out", str(tmp_path / "two"),
           "--no-progress", *ARGS]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert main(["train", RECIPE, "--out", str(tmp_path / "one"), "--no-progress", *ARGS]) == 0
    one, two = _student(tmp_path / "one"), _student(tmp_path / "two")
    init = dict(build_models(load_config(RECIPE, ARGS)).student.named_parameters())
    moved = max(float((one[n] - init[n].detach()).abs().max()) for n in one)
    diff = max(float((one[n] - two[n]).abs().max()) for n in one)
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
