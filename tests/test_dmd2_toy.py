"""DMD2 against analytic teachers: the student must reach the true distribution, not merely train.

Full-size targets (energy <= 0.005, precision >= 0.95, mode weights within 0.03) are measured by
benchmarks/bench_toy_dmd2.py with the recipes' defaults; these tests run shorter versions with looser bounds.
"""
import pytest
import torch

from distill.toy_eval import evaluate, train_toy

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SHORT = ["student.warm_start.steps=1200", "student.warm_start.pairs=8192", "train.steps=600",
         "train.log_every=0", "train.sample_every=0", "train.ema_decay=0.99"]


def assert_close_to_truth(report, energy=0.01, precision=0.9, weight_error=0.05):
    assert report.energy <= energy, report
    assert report.precision >= precision, report
    assert report.max_weight_error <= weight_error, report


def test_ring8_one_step(tmp_path):
    run = train_toy("recipes/toy_ring8_dmd2.yaml", tmp_path, SHORT)
    report = evaluate(run)
    assert_close_to_truth(report)
    assert report.coverage == 8
    # distribution matching moved the student beyond its warm start
    assert run.trainer.step == 600


@pytest.mark.parametrize("teacher", [
    # 5 modes in 2-D with unequal weights and stds
    ["teacher.preset=null", "teacher.means=[[1.5,0],[0,1.5],[-1.5,0],[0,-1.5],[0,0]]",
     "teacher.stds=[0.1,0.15,0.1,0.2,0.1]", "teacher.weights=[1,2,3,1,1]"],
    # 4 modes in 3-D
    ["teacher.preset=null", "teacher.means=[[1,0,0],[0,1,0],[0,0,1],[-1,-1,-1]]", "teacher.std=0.12"],
], ids=["unequal-5-modes-2d", "4-modes-3d"])
def test_explicit_teachers(tmp_path, teacher):
    run = train_toy("recipes/toy_ring8_dmd2.yaml", tmp_path, SHORT + teacher)
    report = evaluate(run)
    assert_close_to_truth(report, energy=0.015)
    assert report.coverage == run.models.mixture.num_components


def test_conditional_with_cfg_matches_the_guided_teacher(tmp_path):
    run = train_toy("recipes/toy_cond_dmd2.yaml", tmp_path, SHORT)
    for label in (0, 1):
        report = evaluate(run, n=2000, label=label)
        assert report.energy <= 0.02, (label, report)
        # class `label` owns the even / odd modes; the student must not put samples on the other class
        weights = torch.tensor(report.mode_weights)
        assert weights[1 - label::2].sum() < 0.05, (label, report)


def test_ring8_four_steps_with_backward_simulation(tmp_path):
    """The 4-step recipe (per-step regression warm start, then DMD2 with backward simulation), shortened:
    all four steps together land on the modes, and sampling with more of its steps does not lose precision."""
    run = train_toy("recipes/toy_ring8_dmd2_4step.yaml", tmp_path,
                    ["student.warm_start.steps=2000", "student.warm_start.pairs=8192", "train.steps=200",
                     "train.log_every=0", "train.sample_every=0", "train.ema_decay=0.99"])
    assert run.models.student.num_steps == 4 and run.config.method["backward_simulation"]
    four = evaluate(run)
    assert_close_to_truth(four)
    assert four.coverage == 8
    one = evaluate(run, steps=1)
    assert four.precision >= one.precision - 0.02, (one, four)
