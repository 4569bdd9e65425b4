"""ESD: lambda = 1 is DMD2 bit for bit, diversity rises with lambda (SDS collapses), tiny SDXL with a LoRA fake score.

The full-size lambda table is benchmarks/bench_esd_lambda.py; the sweep here is shorter (shared warm start,
400 iterations at a higher generator lr) and asserts only the ordering and the collapse.
"""
from __future__ import annotations

import copy

import pytest
import torch

from distill.build import build_run
from distill.config import load_config
from distill.engine import Trainer
from distill.methods.dmd2 import DMD2
from distill.methods.esd import ESD, ESDConfig
from distill.toy_eval import ToyRun, student_samples
from distill.metrics.toy import mode_report
from tests.test_sid_sim import assert_resume_matches_straight, student_moved, tiny_sdxl_recipe

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RECIPE = "recipes/toy_cond_esd.yaml"


def _train(config, tmp_path, student_state=None):
    models, method, data = build_run(config, warm_start=student_state is None)
    if student_state is not None:
        models.student.load_state_dict(student_state)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, tmp_path,
                      progress=False)
    trainer.run()
    return models, method, trainer


def test_lambda_one_is_dmd2_bitwise(tmp_path):
    overrides = ["student.warm_start.steps=50", "student.warm_start.pairs=512", "train.steps=12",
                 "train.log_every=0", "method.generator_every=2"]
    esd_config = load_config(RECIPE, overrides)
    dmd_config = load_config(RECIPE, overrides)  # the same recipe as DMD2 (entropy_weight is not a DMD2 key)
    dmd_config.method["name"] = "dmd2"
    del dmd_config.method["entropy_weight"]
    assert esd_config.method["entropy_weight"] == 1.0
    _, esd, esd_trainer = _train(esd_config, tmp_path / "esd")
    _, dmd, dmd_trainer = _train(dmd_config, tmp_path / "dmd2")
    assert type(esd) is ESD and type(dmd) is DMD2 and esd.fake_weight == 1.0
    esd_weights, dmd_weights = esd_trainer.state_weights(), dmd_trainer.state_weights()
    assert set(esd_weights) == set(dmd_weights) == {"student", "student_ema", "fake_score"}
    for group, tensors in dmd_weights.items():
        for name, value in tensors.items():
            assert torch.equal(value, esd_weights[group][name]), f"{group}.{name}"
    # and lambda != 1 is not DMD2: the first generator step already differs
    other = load_config(RECIPE, overrides + ["method.entropy_weight=0.5", "train.steps=1"])
    _, _, other_trainer = _train(other, tmp_path / "esd05")
    first = load_config(RECIPE, overrides + ["train.steps=1"])
    _, _, first_trainer = _train(first, tmp_path / "esd1")
    a, b = other_trainer.state_weights()["student"], first_trainer.state_weights()["student"]
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_esd_config_extends_dmd2():
    config = ESDConfig(entropy_weight=0.0, guidance_scale=3.0)
    assert config.generator_every == 5 and config.entropy_weight == 0.0


def test_spread_rises_with_lambda_and_sds_collapses(tmp_path):
    """Within-mode spread (relative to the unguided truth) is monotone in lambda; lambda = 0 collapses."""
    base = ["student.warm_start.steps=800", "student.warm_start.pairs=4096", "train.log_every=0", "train.steps=400",
            "generator_optim.lr=1e-3", "train.ema_decay=0.98"]
    # every lambda starts from the same warm-started student (the warm start does not depend on lambda)
    warm = copy.deepcopy(build_run(load_config(RECIPE, base))[0].student.state_dict())
    spreads = {}
    for lam in (0.0, 0.5, 1.0, 1.5):
        config = load_config(RECIPE, base + [f"method.entropy_weight={lam}"])
        models, _, trainer = _train(config, tmp_path / str(lam), warm)
        run = ToyRun(config, models, trainer, 0.0)
        spreads[lam] = []
        for label in (0, 1):
            labels = torch.full((2000,), label)
            truth = models.mixture.sample(2000, class_labels=labels, generator=torch.Generator().manual_seed(label))
            report = mode_report(student_samples(run, 2000, label=label), models.mixture, truth, class_labels=labels)
            spreads[lam].append(report.spread_ratio)
    for label in (0, 1):
        values = [spreads[lam][label] for lam in (0.0, 0.5, 1.0, 1.5)]
        assert all(a < b for a, b in zip(values, values[1:])), spreads
        assert values[0] < 0.15, spreads  # SDS: mode collapse
        assert values[3] > 0.8, spreads  # lambda > 1: at least the truth's spread (ratio ~0.95 for true samples)


def test_tiny_sdxl_with_lora_fake_score(tiny_sdxl_dir, tmp_path):
    # a 2-step student with backward simulation; the generator every 2 iterations, so 4 iterations train it twice
    recipe = tiny_sdxl_recipe("recipes/sdxl_esd.yaml", tiny_sdxl_dir, tmp_path, method={"generator_every": 2},
                              student={"timesteps": [999, 499]})
    config = load_config(recipe)
    assert config.method["name"] == "esd" and config.fake_score.lora.rank == 64
    assert config.method["entropy_weight"] != 1.0
    logs = assert_resume_matches_straight(tmp_path, recipe, {"student", "student_ema", "fake_score"})
    assert [r["step"] for r in logs if "loss_dm" in r] == [1, 3]
    assert all(r["loss_fake"] > 0 for r in logs)
    from distill import checkpoint as ckpt

    weights, _, _ = ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path / "straight" / "checkpoints")[-1])
    assert weights["fake_score"] and all("lora_" in k for k in weights["fake_score"])  # only the adapter trains
    assert student_moved(tmp_path / "straight", tiny_sdxl_dir) > 1e-6
