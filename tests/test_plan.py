"""``distill plan``: the weight, gradient and optimiser bytes it predicts are those of a real run, exactly."""
from __future__ import annotations

import pytest
import torch
import yaml

from distill.build import build_run
from distill.cli import main
from distill.config import load_config
from distill.engine import Trainer
from distill.plan import make_plan


def _recipe(tmp_path, tiny_sdxl_dir, *extra):
    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    return load_config(None, ["teacher.kind=sdxl", f"teacher.path={tiny_sdxl_dir}", "method.name=dmd2",
                              "method.generator_every=1", "data.kind=prompts", f"data.prompts={tmp_path / 'p.txt'}",
                              "data.batch_size=2", "train.ema_decay=0.9", "train.log_every=0", *extra])


def _storage_bytes(modules) -> int:
    storages = {}
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_plan_matches_a_real_run(tiny_sdxl_dir, tmp_path, torch_single_thread):
    config = _recipe(tmp_path, tiny_sdxl_dir)
    plan = make_plan(config, gpus=1, gpu_mem=80)

    models, method, data = build_run(config, warm_start=False)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, tmp_path / "run",
                      progress=False)
    grads = {}
    for name, turn in trainer.turns.items():  # gradient bytes at the moment each optimiser steps
        step = turn.optimizer.step

        def spy(*a, _name=name, _turn=turn, _step=step, **k):
            grads[_name] = sum(p.grad.numel() * p.grad.element_size() for p in _turn.params if p.grad is not None)
            return _step(*a, **k)

        turn.optimizer.step = spy
    trainer.train_step()
    pipeline = models.pipeline
    weights = _storage_bytes([models.teacher, models.student, models.fake_score, *pipeline.text_encoders,
                              pipeline.vae])
    optimizer = sum(v.numel() * v.element_size() for t in trainer.turns.values()
                    for s in t.optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    ema = sum(v.numel() * v.element_size() for v in trainer.ema.shadow.values())
    assert plan.weights_sharded + plan.weights_replicated == weights
    assert plan.gradients == sum(grads.values())
    assert plan.optimizer == optimizer
    assert plan.ema == ema
    assert plan.activations_checkpointed < plan.activations_full  # checkpointing saves less for backward

    sharded = make_plan(_recipe(tmp_path, tiny_sdxl_dir, "train.parallel=fsdp"), gpus=4, gpu_mem=80)
    assert sharded.gradients == -(-plan.gradients // 4) and sharded.optimizer == -(-plan.optimizer // 4)
    assert sharded.weights_replicated == plan.weights_replicated  # text encoders and VAE are not sharded


@pytest.mark.slow
def test_plan_cli_verdict_and_advice(tiny_sdxl_dir, tmp_path, capsys, torch_single_thread):
    config = _recipe(tmp_path, tiny_sdxl_dir)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(config.to_dict()))
    total = make_plan(config, gpus=2, gpu_mem=80).total
    tight = f"{total / 1024**3 / 0.9 * 0.99:.6f}"  # just below what the replicated run needs
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu-mem", tight]) == 0
    out = capsys.readouterr().out
    assert "does NOT fit" in out and "train.parallel=fsdp" in out
    assert main(["plan", str(recipe), "--gpus", "2", "--gpu-mem", tight, "train.parallel=fsdp"]) == 0
    assert "verdict: fits" in capsys.readouterr().out
