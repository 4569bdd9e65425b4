"""In-training FID: logged at the configured steps in log.jsonl, the best checkpoint kept.

A ring8 DMD2 run with ``train.eval.features: identity``: FID is the Frechet distance of the student's
2-d samples to the mixture's own statistics (no network), so it is fast and exact to recompute.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from distill import checkpoint as ckpt
from distill.cli import main
from distill.metrics.stats import Stats
from distill.models.analytic import ring
from tests.test_metrics_cli import assert_one_line_error

pytestmark = pytest.mark.usefixtures("torch_single_thread")
TINY = ["train.steps=6", "train.log_every=2", "student.warm_start.steps=20", "data.batch_size=64",
        "train.eval_every=2", "train.eval.n=512", "train.eval.features=identity", "train.eval.batch_size=256"]


def _reference(path) -> str:
    x = ring(8).sample(20000, generator=torch.Generator().manual_seed(1)).double().numpy()
    Stats(mu=x.mean(0), sigma=np.cov(x, rowvar=False), n=len(x)).save(path)
    return str(path)


def test_fid_is_logged_and_the_best_checkpoint_kept(tmp_path):
    run = tmp_path / "run"
    ref = _reference(tmp_path / "ring8.npz")
    assert main(["train", "recipes/toy_ring8_dmd2.yaml", "--out", str(run), "--no-progress", *TINY,
                 f"train.eval.ref={ref}"]) == 0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_fid"] for r in records if "eval_fid" in r}
    assert sorted(evals) == [2, 4, 6]
    assert all(np.isfinite(v) and v > 0 for v in evals.values())
    assert any("generator_loss" in r for r in records)  # the losses are logged beside them
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    best_step = min(evals, key=evals.get)
    assert best == {"step": best_step, "metric": "fid", "value": pytest.approx(evals[best_step])}
    kept = ckpt.list_checkpoints(run / "checkpoints" / "best")
    assert [p.name for p in kept] == [f"step_{best_step:08d}"]
    assert [p.name for p in ckpt.list_checkpoints(run / "checkpoints")] == ["step_00000006"]  # resume unaffected
    # the logged value is the FID of the best checkpoint's EMA student on the same noise, recomputed here
    from distill.build import build_models
    from distill.config import load_config
    from distill.engine import _load_trainable_state
    from distill.metrics.stats import frechet_distance
    from distill.samplers import sample_student

    config = load_config(run / "config.yaml")
    models = build_models(config, need_fake_score=False)
    weights, _, _ = ckpt.load_checkpoint(kept[0])
    _load_trainable_state(models.student, weights["student_ema"])
    models.student.eval()
    z = torch.cat([torch.randn(256, 2, generator=torch.Generator().manual_seed(start)) for start in (0, 256)])
    x = torch.cat([sample_student(models.student, z[s:s + 256], None,
                                  generator=torch.Generator().manual_seed(s)) for s in (0, 256)]).double().numpy()
    ref_stats = Stats.load(ref)
    by_hand = frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref_stats.mu, ref_stats.sigma)
    assert evals[best_step] == pytest.approx(by_hand, rel=1e-6)


def test_eval_settings_are_checked_before_training(tmp_path, capsys):
    args = ["train", "recipes/toy_ring8_dmd2.yaml", "--out", str(tmp_path / "r"), "--no-progress", *TINY]
    code = main(args + ["train.eval.ref=/no/such.npz"])
    assert_one_line_error(code, capsys.readouterr().err, "statistics file not found")
    code = main(args + ["train.eval.n=1", f"train.eval.ref={_reference(tmp_path / 'r.npz')}"])
    assert_one_line_error(code, capsys.readouterr().err, "train.eval.n must be an integer >= 2")
    assert not (tmp_path / "r" / "checkpoints").exists()
