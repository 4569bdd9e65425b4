"""Flow-matching time sampling (shift, logit-normal, ranges in shifted time) and the flow toy recipes.

The full-length flow toy recipes meet the ring8 targets through ``distill train`` / ``distill sample``
(README, "Flow-matching transformers"); here a shortened DMD2 run checks the same path with looser bounds.
"""
import math

import pytest
import torch

from distill.models.schedules import FlowSchedule


def test_ranges_are_shifted_times_and_uniform_draws_are_uniform_in_unshifted_time():
    s = FlowSchedule(shift=3.0)
    lo, hi = s.time_at(0.02), s.time_at(0.98)
    assert lo == pytest.approx(3 * 0.02 / (1 + 2 * 0.02)) and hi == pytest.approx(3 * 0.98 / (1 + 2 * 0.98))
    t = s.sample_t(200_000, lo, hi, generator=torch.Generator().manual_seed(0))
    assert lo - 1e-12 <= float(t.min()) and float(t.max()) <= hi + 1e-12
    u = s.unshift_time(t)  # inverse of the shift: uniform on [0.02, 0.98]
    assert float(u.mean()) == pytest.approx(0.5, abs=3e-3)
    assert float(u.var()) == pytest.approx(0.96**2 / 12, rel=2e-2)
    assert torch.allclose(s.shift_time(s.unshift_time(t)), t, atol=1e-12)
    # shift 1 is the identity: the old unshifted behaviour
    assert FlowSchedule().time_at(0.3) == pytest.approx(0.3)


def test_logit_normal_draws_follow_sd3s_density_then_the_shift():
    s = FlowSchedule(shift=1.0, time_distribution="logit_normal", logit_mean=0.5, logit_std=0.8)
    t = s.sample_t(200_000, generator=torch.Generator().manual_seed(1))
    z = torch.logit(t)
    assert float(z.mean()) == pytest.approx(0.5, abs=0.01) and float(z.std()) == pytest.approx(0.8, abs=0.01)
    # truncated to a range, and shifted: logit(unshift(t)) is the truncated normal
    s3 = FlowSchedule(shift=3.0, time_distribution="logit_normal")
    t = s3.sample_t(100_000, s3.time_at(0.5), s3.time_at(0.9), generator=torch.Generator().manual_seed(2))
    u = s3.unshift_time(t)
    assert 0.5 - 1e-9 <= float(u.min()) and float(u.max()) <= 0.9 + 1e-9
    p = torch.special.ndtr(torch.logit(torch.tensor([0.5, 0.9], dtype=torch.float64)))
    median = torch.sigmoid(torch.special.ndtri(p.mean()))  # of the truncated logit-normal
    assert float(u.median()) == pytest.approx(float(median), abs=3e-3)
    with pytest.raises(ValueError):
        FlowSchedule(time_distribution="beta")


def test_flux_dynamic_shift_is_the_static_formula_with_exp_mu():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from distill.models.backbones.common import flow_schedule
    from distill.models.testing import FLUX_SCHEDULER_CONFIG

    config = {k: v for k, v in FLUX_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    seq = 1024  # 512 px FLUX: (512 / 16)^2 tokens
    ours = flow_schedule(config, seq)
    ref = FlowMatchEulerDiscreteScheduler(**config)
    mu = 0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256)
    ref.set_timesteps(sigmas=[0.9, 0.5, 0.1], mu=mu)
    expected = ours.shift_time(torch.tensor([0.9, 0.5, 0.1], dtype=torch.float64))
    assert ours.shift == pytest.approx(math.exp(mu))
    assert torch.allclose(ref.sigmas[:3].double(), expected, atol=1e-6)


def test_flow_ring8_dmd2_short(tmp_path):
    from distill.toy_eval import evaluate, train_toy

    torch.set_num_threads(1)
    run = train_toy("recipes/toy_ring8_flow_dmd2.yaml", tmp_path,
                    ["student.warm_start.steps=1200", "student.warm_start.pairs=8192", "train.steps=600",
                     "train.log_every=0", "train.sample_every=0", "train.ema_decay=0.99"])
    assert run.models.teacher.schedule.shift == 3.0 and float(run.models.student.timesteps[0]) == 1.0
    report = evaluate(run)
    assert report.energy <= 0.01 and report.precision >= 0.9 and report.max_weight_error <= 0.05, report
    assert report.coverage == 8
