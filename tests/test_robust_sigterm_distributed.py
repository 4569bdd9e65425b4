"""SIGTERM to a 2-process ``torchrun`` run in the middle of a step (gloo, CPU).

The launcher forwards SIGTERM to both workers (as a cluster scheduler's preemption does); rank 0 is held
inside the critic loss of step 2 when it arrives, so the signal lands mid-step. Both workers must finish
the step, agree (all-reduce MAX of the flag), write one complete checkpoint together and exit with 143;
``--resume auto`` on 2 processes then ends with exactly the weights of an uninterrupted 2-process run.
A signal that reaches one worker only stops both at the same boundary.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from distill import checkpoint as ckpt
from tests.robust_helpers import RECIPE, TINY, assert_same_weights, final_weights
from tests.test_distributed import _free_port, _torchrun

ROOT = Path(__file__).resolve().parents[1]
ARGS = [*TINY, "train.steps=5", "train.checkpoint_every=0", "train.log_every=1", "data.batch_size=32"]

DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    from distill.methods.dmd2 import DMD2
    info_dir, marker = Path(sys.argv[1]), sys.argv[2]
    rank = int(os.environ.get("RANK", 0))
    if marker != "-":
        real = DMD2.critic_loss

        def held(self, batch, *args, **kwargs):
            if batch.rng.step == 2 and marker == "rank1-only" and rank == 1:
                import signal
                os.kill(os.getpid(), signal.SIGTERM)  # only this process is told to stop
            elif batch.rng.step == 2 and rank == 0 and marker != "rank1-only":
                Path(marker).write_text("in step 2")
                time.sleep(5)  # the launcher's SIGTERM arrives here, in the middle of the step
            return real(self, batch, *args, **kwargs)

        DMD2.critic_loss = held
    from distill.cli import main
    rc = main(sys.argv[3:])
    (info_dir / f"rank{rank}.json").write_text(json.dumps({"rc": rc}))
    sys.exit(rc)
""")


def _launch(tmp_path: Path, run: Path, info: Path, marker: str) -> subprocess.Popen:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    info.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "ACCELERATE_USE_CPU": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = _torchrun() + ["--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                         str(driver), str(info), marker, "train", RECIPE, "--out", str(run), "--no-progress", *ARGS]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 240) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun did not finish: {out[-3000:]}")
    return out


@pytest.mark.slow
def test_sigterm_to_torchrun_mid_step_saves_one_checkpoint_and_resumes_bitwise(tmp_path):
    straight = tmp_path / "straight"
    proc = _launch(tmp_path, straight, tmp_path / "info_straight", "-")
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]

    run, marker = tmp_path / "run", tmp_path / "marker"
    proc = _launch(tmp_path, run, tmp_path / "info_stopped", str(marker))
    deadline = time.time() + 180
    while not (marker.exists() and marker.read_text()):
        if proc.poll() is not None:
            raise AssertionError(f"run ended before step 2: {proc.stdout.read()[-3000:]}")
        assert time.time() < deadline, "never reached step 2"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out = _finish(proc, timeout=120)
    assert proc.returncode != 0  # the run did not finish ...
    infos = [json.loads((tmp_path / "info_stopped" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos == [{"rc": 143}, {"rc": 143}], out[-3000:]  # ... and both workers exited cleanly, saying why
    # one new checkpoint, at the boundary after the interrupted step, complete and written by both together
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000003"], out[-3000:]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000003") is None
    assert json.loads((run / "checkpoints" / "step_00000003" / "state.json").read_text())["world_size"] == 2
    assert not list((run / "checkpoints").glob(".tmp-*"))

    proc = _launch(tmp_path, run, tmp_path / "info_resumed", "-")
    out = _finish(proc)
    assert proc.returncode == 0, out[-3000:]
    assert "resuming from" in out and "step_00000003" in out
    assert_same_weights(final_weights(run)[0], final_weights(straight)[0])
    assert final_weights(run)[2]["step"] == 5


@pytest.mark.slow
def test_sigterm_to_one_worker_stops_both_at_the_same_step(tmp_path):
    run = tmp_path / "run"
    proc = _launch(tmp_path, run, tmp_path / "info", "rank1-only")
    out = _finish(proc)
    infos = [json.loads((tmp_path / "info" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert infos == [{"rc": 143}, {"rc": 143}], out[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000003") is None
