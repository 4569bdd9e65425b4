"""Resume is exact: N steps straight == N/2 steps, stop, resume, N/2 steps -- bitwise, on CPU.

A tiny toy DMD2 (ring8 teacher, 32-wide MLPs, batch 64) with the two time-scale update rule
(``generator_every=3``, so the resumed run must restart in the right TTUR phase), LR warm-up and EMA on.
Compared: student, fake score, EMA and both optimisers' states (every tensor, ``torch.equal``).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill import checkpoint as ckpt
from distill.build import build_run
from distill.cli import main as cli_main
from distill.config import load_config
from distill.engine import Trainer

# A frozen toy DMD2 recipe (ring8 teacher): recipes/*.yaml are tuned by hand and must not change what
# these tests measure (a warm start there would also cost minutes).
RECIPE = str(Path(__file__).resolve().parent / "recipes" / "toy_dmd2_frozen.yaml")
TINY = ["student.net.hidden=32", "student.net.depth=2", "fake_score.net.hidden=32", "fake_score.net.depth=2",
        "data.batch_size=64", "method.generator_every=3", "train.ema_decay=0.9", "train.log_every=0",
        "generator_optim.warmup_steps=2", "critic_optim.warmup_steps=2"]
STEPS = 8  # generator updates at 0, 3, 6: the resumed half starts at step 4, mid-phase


def _train(out: Path, steps: int, resume: str | None = None) -> Trainer:
    config = load_config(RECIPE, TINY + [f"train.steps={steps}"])
    _, method, data = build_run(config)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, out, resume=resume,
                      progress=False)
    trainer.run()
    return trainer


def _latest(run: Path):
    found = ckpt.list_checkpoints(run / "checkpoints")
    assert found, f"no checkpoint in {run}"
    return ckpt.load_checkpoint(found[-1])


def _flat_tensors(tree, prefix="") -> dict[str, torch.Tensor]:
    """Every tensor inside nested dicts / lists (optimiser states), keyed by its path."""
    out = {}
    if torch.is_tensor(tree):
        out[prefix] = tree
    elif isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flat_tensors(v, f"{prefix}/{k}"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(_flat_tensors(v, f"{prefix}/{i}"))
    return out


def _assert_identical(run_a: Path, run_b: Path) -> None:
    weights_a, train_a, state_a = _latest(run_a)
    weights_b, train_b, state_b = _latest(run_b)
    assert state_a["step"] == state_b["step"] == STEPS
    assert set(weights_a) == set(weights_b) == {"student", "fake_score", "student_ema"}
    for group in weights_a:
        assert set(weights_a[group]) == set(weights_b[group])
        for name, value in weights_a[group].items():
            assert torch.equal(value, weights_b[group][name]), f"{group}.{name} differs after resume"
    opt_a, opt_b = _flat_tensors(train_a["optimizers"]), _flat_tensors(train_b["optimizers"])
    assert set(opt_a) == set(opt_b) and len(opt_a) > 10
    for key, value in opt_a.items():
        assert torch.equal(value, opt_b[key]), f"optimizer state {key} differs after resume"
    assert train_a["schedulers"] == train_b["schedulers"]
    # three generator updates (steps 0, 3, 6) and eight critic updates, in both runs
    assert int(train_a["optimizers"]["generator"]["state"][0]["step"]) == 3
    assert int(train_a["optimizers"]["critic"]["state"][0]["step"]) == STEPS


def test_resume_is_bitwise_identical(tmp_path, torch_single_thread):
    straight = _train(tmp_path / "straight", STEPS)
    first = _train(tmp_path / "halves", STEPS // 2)
    assert first.resumed_from is None
    second = _train(tmp_path / "halves", STEPS, resume="auto")
    assert second.resumed_from is not None and second.resumed_from.name == f"step_{STEPS // 2:08d}"
    assert straight.step == second.step == STEPS
    _assert_identical(tmp_path / "straight", tmp_path / "halves")

    # the comparison can fail: training moved the weights, and one step fewer gives different ones
    init = load_config(RECIPE, TINY)
    models, _, _ = build_run(init)
    weights, _, _ = _latest(tmp_path / "straight")
    initial = dict(models.student.named_parameters())
    moved = max(float((weights["student"][n] - initial[n].detach()).abs().max()) for n in weights["student"])
    assert moved > 1e-4
    _train(tmp_path / "short", STEPS - 1)
    short, _, _ = _latest(tmp_path / "short")
    assert any(not torch.equal(short["fake_score"][n], weights["fake_score"][n]) for n in short["fake_score"])


def test_resume_auto_through_cli(tmp_path, torch_single_thread):
    run_straight, run_halves = tmp_path / "cli_straight", tmp_path / "cli_halves"
    args = ["--no-progress", *TINY]
    assert cli_main(["train", RECIPE, "--out", str(run_straight), "--resume", "none", *args,
                     f"train.steps={STEPS}"]) == 0
    assert cli_main(["train", RECIPE, "--out", str(run_halves), *args, f"train.steps={STEPS // 2}"]) == 0
    assert [p.name for p in ckpt.list_checkpoints(run_halves / "checkpoints")] == [f"step_{STEPS // 2:08d}"]
    # --resume defaults to auto; also pass it explicitly
    assert cli_main(["train", RECIPE, "--out", str(run_halves), "--resume", "auto", *args,
                     f"train.steps={STEPS}"]) == 0
    _assert_identical(run_straight, run_halves)
    # a finished run resumed again does nothing and stays identical
    assert cli_main(["train", RECIPE, "--out", str(run_halves), *args, f"train.steps={STEPS}"]) == 0
    _assert_identical(run_straight, run_halves)


def test_resume_from_explicit_path_and_missing_checkpoint(tmp_path, torch_single_thread, capsys):
    _train(tmp_path / "a", STEPS // 2)
    path = ckpt.list_checkpoints(tmp_path / "a" / "checkpoints")[-1]
    resumed = _train(tmp_path / "b", STEPS, resume=str(path))
    assert resumed.resumed_from == path and resumed.step == STEPS
    rc = cli_main(["train", RECIPE, "--out", str(tmp_path / "c"), "--resume", str(tmp_path / "nowhere"),
                   "--no-progress", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: no complete checkpoint") and "\n" not in err
