"""Interrupted work is kept, and logs answer "is it working".

* SIGTERM / SIGINT in the middle of a training step: the step finishes, one checkpoint is written, the CLI
  exits with 143 / 130, and ``--resume auto`` ends with the weights of an uninterrupted run (bitwise).
* The regression warm start saves its progress on SIGTERM, logs with ``"phase": "warm_start"`` and resumes
  to the same student as an uninterrupted warm start.
* ``train.checkpoint_minutes`` checkpoints by the clock.
* Each log line is the mean over its interval of every value, the generator's loss included when
  ``generator_every`` does not divide ``log_every``.
"""
from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from distill import checkpoint as ckpt
from distill import interrupt
from distill.cli import main as cli_main
from distill.methods.dmd2 import DMD2
from tests.robust_helpers import RECIPE, TINY, assert_same_weights, final_weights

STEPS6 = [*TINY, "train.steps=6", "train.checkpoint_every=0"]


def _signal_during(monkeypatch, cls, method: str, step: int, signum: int) -> None:
    """Make ``cls.method`` deliver ``signum`` to this process while it computes step ``step``."""
    real = getattr(cls, method)

    def patched(self, batch, *args, **kwargs):
        if batch.rng.step == step:
            os.kill(os.getpid(), signum)  # the handler runs now, in the middle of the step
        return real(self, batch, *args, **kwargs)

    monkeypatch.setattr(cls, method, patched)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_step_saves_once_and_resume_matches(tmp_path, monkeypatch, capsys, torch_single_thread, signum):
    straight = tmp_path / "straight"
    assert cli_main(["train", RECIPE, "--out", str(straight), "--no-progress", *STEPS6]) == 0

    run = tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_during(patch, DMD2, "critic_loss", step=2, signum=signum)
        code = cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *STEPS6])
    assert code == 128 + signum
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name}" in err and "step 3" in err
    # exactly one checkpoint, at the boundary after the interrupted step, complete and verified
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000003"]
    assert ckpt.verify_checkpoint(run / "checkpoints" / "step_00000003") is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers were put back
    assert interrupt.requested() == 0
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3]

    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *STEPS6]) == 0
    assert_same_weights(final_weights(run)[0], final_weights(straight)[0])
    a, b = final_weights(run)[1]["optimizers"], final_weights(straight)[1]["optimizers"]
    for name in a:
        assert all(torch.equal(a[name]["state"][i][k], b[name]["state"][i][k]) for i in a[name]["state"]
                   for k in a[name]["state"][i] if torch.is_tensor(a[name]["state"][i][k]))


WARM = [*STEPS6, "train.steps=2", "student.warm_start.steps=6", "student.warm_start.ode_steps=4",
        "student.warm_start.pairs=0", "train.log_every=2"]


def test_warm_start_saves_logs_and_resumes(tmp_path, monkeypatch, capsys, torch_single_thread):
    import distill.warm_start as ws

    straight = tmp_path / "straight"
    assert cli_main(["train", RECIPE, "--out", str(straight), "--no-progress", *WARM]) == 0
    assert not (straight / "checkpoints" / "warm_start").exists()  # superseded by the training checkpoint

    run = tmp_path / "run"
    real_pairs = ws._make_pairs
    calls = []

    def pairs_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:  # iteration 3 of 6 (fresh pairs each iteration)
            os.kill(os.getpid(), signal.SIGTERM)
        return real_pairs(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(ws, "_make_pairs", pairs_then_signal)
        assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *WARM]) == 143
    assert "warm start saved at iteration 4 of 6" in capsys.readouterr().err
    saved = ckpt.list_checkpoints(run / "checkpoints" / "warm_start")
    assert [p.name for p in saved] == ["step_00000004"] and not ckpt.list_checkpoints(run / "checkpoints")
    state = json.loads((saved[0] / "state.json").read_text())
    assert state["phase"] == "warm_start" and state["done"] is False
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"]) for r in lines] == [("warm_start", 2), ("warm_start", 4)]

    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *WARM]) == 0
    assert "warm start: resuming from" in capsys.readouterr().out
    assert_same_weights(final_weights(run)[0], final_weights(straight)[0])
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [(r.get("phase", "train"), r["step"]) for r in lines] == [
        ("warm_start", 2), ("warm_start", 4), ("warm_start", 6), ("train", 2)]
    reference = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["warm_start_loss"] for r in lines[:3]] == [r["warm_start_loss"] for r in reference[:3]]


def test_time_based_checkpoints(tmp_path, torch_single_thread):
    # a period shorter than a step: a checkpoint at every step boundary (keep them all to count them)
    run = tmp_path / "often"
    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *STEPS6, "train.steps=3",
                     "train.checkpoint_minutes=1e-9", "train.keep_checkpoints=0"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == [f"step_0000000{i}" for i in (1, 2, 3)]
    # the default, 10 minutes, does not fire in a few seconds: only the final checkpoint
    run = tmp_path / "default"
    assert cli_main(["train", RECIPE, "--out", str(run), "--no-progress", *STEPS6, "train.steps=3",
                     "train.checkpoint_minutes=10", "train.keep_checkpoints=0"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000003"]


def test_log_lines_are_interval_means_with_the_generator_loss(tmp_path, torch_single_thread):
    common = [*STEPS6, "train.steps=8", "method.generator_every=3"]
    every = tmp_path / "every"
    assert cli_main(["train", RECIPE, "--out", str(every), "--no-progress", *common, "train.log_every=1"]) == 0
    sparse = tmp_path / "sparse"
    assert cli_main(["train", RECIPE, "--out", str(sparse), "--no-progress", *common, "train.log_every=4"]) == 0
    per_step = [json.loads(line) for line in (every / "log.jsonl").read_text().splitlines()]
    lines = [json.loads(line) for line in (sparse / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [4, 8]
    for line, interval in zip(lines, (per_step[0:4], per_step[4:8])):
        # generator updates at steps 0, 3, 6: each interval holds one or two, and logs their mean
        assert "generator_loss" in line and "loss_dm" in line
        for key in ("generator_loss", "critic_loss", "loss_fake", "generator_grad_norm", "critic_grad_norm"):
            values = [r[key] for r in interval if key in r]
            assert line[key] == pytest.approx(sum(values) / len(values), rel=1e-12, abs=0), key
        assert line["critic_lr"] == interval[-1]["critic_lr"]
        assert "phase" not in line  # training lines; warm-start lines say "phase": "warm_start"
    gen_steps = [r["step"] for r in per_step if "generator_loss" in r]
    assert gen_steps == [1, 4, 7]
