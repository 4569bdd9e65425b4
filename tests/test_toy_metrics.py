import torch

from distill.metrics.toy import energy_distance, mode_report, precision_radius
from distill.models.analytic import GaussianMixture, build_mixture


def test_energy_distance_zero_for_same_distribution_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2000, 2, generator=g), torch.randn(2000, 2, generator=g)
    floor = energy_distance(a, b)
    assert 0 < floor < 5e-3
    assert energy_distance(a, b + 0.5) > 0.1


def test_mode_report_on_truth_and_on_collapse():
    mix = build_mixture("ring8")
    g = torch.Generator().manual_seed(0)
    truth = mode_report(mix.sample(4000, generator=g), mix, generator=g)
    assert truth.precision > 0.97 and truth.max_weight_error < 0.03 and truth.coverage == 8
    assert 0.85 < truth.spread_ratio < 1.1
    collapsed = mix.means[torch.arange(4000) % 8].float()
    rep = mode_report(collapsed, mix, generator=g)
    assert rep.spread_ratio < 0.01 and rep.precision == 1.0
    half = mix.sample(4000, generator=g, return_components=True)
    only_four = half[0][half[1] < 4]
    rep = mode_report(only_four, mix, generator=g)
    assert rep.coverage == 4 and rep.max_weight_error > 0.1


def test_precision_radius_matches_2d_and_scales_with_dimension():
    assert abs(precision_radius(2) - 3.0) < 1e-9
    assert precision_radius(10) > precision_radius(3) > 3.0
    mix = GaussianMixture(torch.randn(3, 6) * 3, stds=0.2)
    rep = mode_report(mix.sample(3000), mix)
    assert rep.precision > 0.97
