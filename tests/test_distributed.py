"""Two CPU processes (``torchrun --nproc_per_node 2``, gloo) train the same model as one process.

The Trainer draws every random number for the global batch and keeps its rows (``BatchRNG``) and
all-reduces gradients itself, so 2 processes x 32 rows must give the weights of 1 process x 64 rows up to
float summation order -- including parameters that get no gradient in a step (a GAN head used only by the
generator's term), which must stay untouched as in one process. The test also checks that the 2-process run really ran distributed (gloo backend,
world size 2 in every rank and in the checkpoint's ``state.json``), that training moved the weights far
more than the tolerance, and that a run with a different global batch does *not* match.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from distill import checkpoint as ckpt
from distill.build import build_run
from distill.cli import main as cli_main
from distill.config import load_config

ROOT = Path(__file__).resolve().parents[1]
# A frozen toy DMD2 recipe (ring8 teacher): recipes/*.yaml are tuned by hand and must not change what
# these tests measure (a warm start there would also cost minutes).
RECIPE = str(Path(__file__).resolve().parent / "recipes" / "toy_dmd2_frozen.yaml")
TINY = ["student.net.hidden=32", "student.net.depth=2", "fake_score.net.hidden=32", "fake_score.net.depth=2",
        "method.generator_every=2", "train.ema_decay=0.9", "train.log_every=0", "train.steps=6",
        "generator_optim.warmup_steps=0", "critic_optim.warmup_steps=0",
        # a GAN head that only the generator's term uses: the critic step gives its parameters no gradient,
        # which N processes must treat as one process does (no update, so no weight decay)
        "method.gan_generator_weight=0.05", "critic_optim.weight_decay=0.5"]
TOL = 1e-5

DRIVER = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    from distill.cli import main
    rc = main(sys.argv[2:])
    info = {"rc": rc, "initialized": dist.is_initialized(), "env_world": int(os.environ.get("WORLD_SIZE", 1))}
    if dist.is_initialized():
        info.update(backend=dist.get_backend(), world=dist.get_world_size(), rank=dist.get_rank())
    with open(os.path.join(sys.argv[1], f"rank{os.environ.get('RANK', 0)}.json"), "w") as f:
        json.dump(info, f)
    sys.exit(rc)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _weights(run: Path):
    found = ckpt.list_checkpoints(run / "checkpoints")
    assert found, f"no checkpoint in {run}"
    return ckpt.load_checkpoint(found[-1])


def _max_diff(a: dict, b: dict) -> float:
    return max(float((a[g][n] - b[g][n]).abs().max()) for g in a for n in a[g])


def test_two_processes_match_one(tmp_path, torch_single_thread):
    if shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists():
        pytest.skip("torchrun not available")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    info_dir = tmp_path / "info"
    info_dir.mkdir()
    run2 = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = _torchrun() + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                         str(driver), str(info_dir), "train", RECIPE, "--out", str(run2), "--no-progress",
                         *TINY, "data.batch_size=64"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    infos = [json.loads((info_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, info in enumerate(infos):
        assert info == {"rc": 0, "initialized": True, "env_world": 2, "backend": "gloo", "world": 2, "rank": rank}
    two, train_state, state = _weights(run2)
    assert state["world_size"] == 2 and state["step"] == 6

    # one process, same global batch
    run1 = tmp_path / "one"
    assert cli_main(["train", RECIPE, "--out", str(run1), "--no-progress", *TINY, "data.batch_size=64"]) == 0
    one, _, state1 = _weights(run1)
    assert state1["world_size"] == 1
    assert set(one) == set(two) == {"student", "fake_score", "student_ema", "discriminator"}
    diff = _max_diff(one, two)
    print(f"max |2 procs - 1 proc| = {diff:.3g}")
    assert diff < TOL, f"2 processes differ from 1 by {diff}"

    # not trivially equal: training moved the weights by far more than the tolerance ...
    models, _, _ = build_run(load_config(RECIPE, TINY + ["data.batch_size=64"]))
    init = {"student": {n: p.detach() for n, p in models.student.named_parameters()},
            "fake_score": {n: p.detach() for n, p in models.fake_score.named_parameters() if n in one["fake_score"]}}
    moved = _max_diff({g: {n: one[g][n] for n in init[g]} for g in init}, init)
    print(f"max |trained - init| = {moved:.3g}")
    assert moved > 1000 * TOL
    # ... and a different global batch (what a per-process batch of 64 would be) gives different weights
    run_big = tmp_path / "big"
    assert cli_main(["train", RECIPE, "--out", str(run_big), "--no-progress", *TINY, "data.batch_size=128"]) == 0
    big, _, _ = _weights(run_big)
    assert _max_diff(one, big) > 100 * TOL
