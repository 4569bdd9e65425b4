"""A process killed (SIGKILL) in the middle of writing a checkpoint leaves the previous one loadable.

A child process trains a tiny toy DMD2 through ``distill train`` with a checkpoint every 2 steps; its
``save_file`` is patched to stop (sleep) after the first weight file of the *second* checkpoint, and the
parent kills it there with SIGKILL. Then: the half-written ``.tmp-*`` folder is ignored, the first
checkpoint is the one ``--resume auto`` picks, it loads, the resumed run finishes with exactly the weights
of an uninterrupted run, and the next save removes the leftover.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distill import checkpoint as ckpt
from distill.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
# A frozen toy DMD2 recipe (ring8 teacher): recipes/*.yaml are tuned by hand and must not change what
# these tests measure (a warm start there would also cost minutes).
RECIPE = str(Path(__file__).resolve().parent / "recipes" / "toy_dmd2_frozen.yaml")
TINY = ["student.net.hidden=32", "student.net.depth=2", "fake_score.net.hidden=32", "fake_score.net.depth=2",
        "data.batch_size=64", "method.generator_every=2", "train.ema_decay=0.9", "train.log_every=0",
        "train.checkpoint_every=2", "train.steps=4"]

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import distill.checkpoint as ckpt
    marker = Path(sys.argv[1])
    real_save_file = ckpt.save_file
    folders = []

    def slow_save_file(tensors, filename, *args, **kwargs):
        folder = str(Path(filename).parent)
        if folder not in folders:
            folders.append(folder)
        real_save_file(tensors, filename, *args, **kwargs)
        if len(folders) == 2:  # the second checkpoint: one file written, the rest never will be
            marker.write_text(folder)
            time.sleep(120)

    ckpt.save_file = slow_save_file
    from distill.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_sigkill_during_checkpoint_write_keeps_previous(tmp_path, torch_single_thread):
    run = tmp_path / "run"
    marker = tmp_path / "writing"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script), str(marker), "train", RECIPE, "--out", str(run),
                              "--no-progress", *TINY], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 90
        while not (marker.exists() and marker.read_text()):  # created and written
            if child.poll() is not None:
                raise AssertionError(f"child exited early ({child.returncode}): {child.stdout.read().decode()[-2000:]}")
            assert time.time() < deadline, "child never reached the second checkpoint"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL

    root = run / "checkpoints"
    partial = Path(marker.read_text())
    assert partial.parent == root and partial.name.startswith(f".tmp-step_00000004-{child.pid}")
    assert partial.is_dir() and len(list(partial.glob("*.safetensors"))) == 1
    assert not (partial / "state.json").exists()
    assert not (root / "step_00000004").exists()

    # the interrupted write is invisible: only the complete first checkpoint counts, and it loads
    assert ckpt.list_checkpoints(root) == [root / "step_00000002"]
    assert ckpt.resolve_resume("auto", root) == root / "step_00000002"
    weights, training_state, state = ckpt.load_checkpoint(root / "step_00000002")
    assert state["step"] == 2 and set(weights) == {"student", "fake_score", "student_ema"}
    assert set(training_state["optimizers"]) == {"generator", "critic"}

    # resuming finishes the run; the result equals an uninterrupted run, and the leftover is cleaned up
    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *TINY]) == 0
    assert ckpt.list_checkpoints(root)[-1] == root / "step_00000004"
    assert not partial.exists() and not list(root.glob(".tmp-*"))
    assert cli_main(["train", RECIPE, "--out", str(tmp_path / "straight"), "--no-progress", *TINY]) == 0
    resumed, _, _ = ckpt.load_checkpoint(root / "step_00000004")
    straight, _, _ = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_00000004")
    for group, tensors in straight.items():
        for name, value in tensors.items():
            assert torch.equal(value, resumed[group][name]), f"{group}.{name}"
