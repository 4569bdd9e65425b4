"""NaN guard: a non-finite loss or gradient skips the update (counted); ``max_nan_steps`` in a row stop the run
with a one-line ToolkitError naming the last good checkpoint.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from distill import checkpoint as ckpt
from distill.cli import main as cli_main
from distill.config import OptimConfig, TrainConfig
from distill.engine import Trainer
from distill.methods.base import Batch, BatchRNG, Method
from distill.models.errors import ToolkitError

# A frozen toy DMD2 recipe (ring8 teacher): recipes/*.yaml are tuned by hand and must not change what
# these tests measure (a warm start there would also cost minutes).
RECIPE = str(Path(__file__).resolve().parent / "recipes" / "toy_dmd2_frozen.yaml")


class Data:
    global_batch_size = 8

    def __call__(self, step, rows, device):
        rng = BatchRNG(0, step, self.global_batch_size, rows, device)
        return Batch(noise=rng.randn(2), cond=None, rng=rng)


class NaNAt(Method):
    """A regression whose generator loss is NaN at the steps in ``bad`` (all steps >= ``from_step`` too)."""

    generator_every = 1

    def __init__(self, bad=(), from_step=None):
        self.student, self.critic = nn.Linear(2, 2), nn.Linear(2, 2)
        self.bad, self.from_step = set(bad), from_step

    def _is_bad(self, step):
        return step in self.bad or (self.from_step is not None and step >= self.from_step)

    def generator_loss(self, batch):
        loss = ((self.student(batch.noise) - 1) ** 2).mean()
        if self._is_bad(batch.rng.step):
            loss = loss * float("nan")
        return loss, {}

    def critic_loss(self, batch, sample=None):
        return ((self.critic(batch.noise) + 1) ** 2).mean(), {}

    def generator_modules(self):
        return {"student": self.student}

    def critic_modules(self):
        return {"critic": self.critic}


def _trainer(method, out, **train) -> Trainer:
    torch.manual_seed(0)
    cfg = TrainConfig(**{"steps": 10, "log_every": 1, "ema_decay": 0.5, **train})
    return Trainer(method, Data(), cfg, OptimConfig(lr=1e-2), OptimConfig(lr=1e-2), out, progress=False)


def _snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_nan_steps_are_skipped_and_counted(tmp_path, torch_single_thread):
    method = NaNAt(bad={2, 3, 6})
    trainer = _trainer(method, tmp_path, steps=8, max_nan_steps=3)
    streaks = []
    while trainer.step < 8:
        step = trainer.step
        before, critic_before = _snapshot(method.student), _snapshot(method.critic)
        ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
        adam_steps = int(trainer.turns["generator"].optimizer.state[method.student.weight]["step"]) if step else 0
        logs = trainer.train_step()
        streaks.append(trainer.nan_streak)
        after = _snapshot(method.student)
        if step in method.bad:
            assert logs.get("skipped") == 1.0
            assert all(torch.equal(before[n], after[n]) for n in before), f"student updated at NaN step {step}"
            assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.state_dict().items())
            assert int(trainer.turns["generator"].optimizer.state[method.student.weight]["step"]) == adam_steps
            assert all(p.grad is None for p in method.student.parameters())  # no NaN gradient left behind
        else:
            assert "skipped" not in logs
            assert any(not torch.equal(before[n], after[n]) for n in before)
        # the critic's update is independent of the generator's NaN
        assert any(not torch.equal(critic_before[n], p) for n, p in method.critic.named_parameters())
    assert streaks == [0, 0, 1, 2, 0, 0, 1, 0]
    assert trainer.nan_total == 3
    assert all(torch.isfinite(p).all() for p in method.student.parameters())
    trainer.save()
    _, _, state = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "checkpoints")[-1])
    assert state["nan_total"] == 3 and state["nan_streak"] == 0


def test_consecutive_nans_stop_with_one_line_error_naming_last_checkpoint(tmp_path, torch_single_thread):
    method = NaNAt(from_step=5)
    trainer = _trainer(method, tmp_path, steps=20, max_nan_steps=4, checkpoint_every=2)
    with pytest.raises(ToolkitError) as info:
        trainer.run()
    message = str(info.value)
    assert trainer.step == 9  # steps 5, 6, 7, 8 were NaN: the 4th in a row stops the run
    last = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    assert last.name == "step_00000008"
    assert "\n" not in message and "4 consecutive non-finite" in message and str(last) in message
    weights, _, state = ckpt.load_checkpoint(last)
    assert state["nan_total"] == 3 and state["nan_streak"] == 3
    # no NaN ever reached the saved weights: they are the weights of the last good step (4)
    final = _snapshot(method.student)
    assert all(torch.equal(weights["student"][n], final[n]) for n in final)
    assert all(torch.isfinite(v).all() for group in weights.values() for v in group.values())
    # the log recorded the skipped steps
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert sum('"skipped": 1.0' in line for line in lines) == 3  # the 4th NaN step raises before logging


def test_cli_reports_nan_stop_as_one_line(tmp_path, torch_single_thread, monkeypatch, capsys):
    from distill.methods.dmd2 import DMD2

    real_loss = DMD2.generator_loss

    def nan_loss(self, batch):
        loss, logs = real_loss(self, batch)
        return loss * float("nan") if batch.rng.step >= 2 else loss, logs

    monkeypatch.setattr(DMD2, "generator_loss", nan_loss)
    rc = cli_main(["train", RECIPE, "--out", str(tmp_path / "run"), "--no-progress", "student.net.hidden=16",
                   "fake_score.net.hidden=16", "data.batch_size=16", "method.generator_every=1",
                   "train.steps=50", "train.max_nan_steps=3", "train.checkpoint_every=1", "train.log_every=0"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: stopped at step 5: 3 consecutive non-finite")
    assert str(tmp_path / "run" / "checkpoints" / "step_00000004") in err
