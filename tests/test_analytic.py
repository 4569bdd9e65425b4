import math

import pytest
import torch

from distill.models.analytic import GaussianMixture, build_mixture, mixture_denoiser, ring
from distill.models.conditioning import ClassConditioner
from distill.models.schedules import EDMSchedule, FlowSchedule, VPSchedule


def tweedie_x0(mixture, x_t, alpha, sigma, labels=None):
    """E[x0|x_t] = (x_t + sigma^2 grad log q_t(x_t)) / alpha, by autograd of the noisy density."""
    x = x_t.clone().double().requires_grad_(True)
    logp = mixture.log_prob_noisy(x, alpha, sigma, labels).sum()
    (score,) = torch.autograd.grad(logp, x)
    a = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1)
    s = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1)
    return (x.detach() + s**2 * score) / a


@pytest.mark.parametrize("mixture", [
    ring(8),
    GaussianMixture(torch.randn(5, 3), stds=[0.1, 0.2, 0.05, 0.3, 0.15], weights=[1, 2, 3, 1, 1]),
    ring(8, classes=2),
])
def test_posterior_mean_equals_tweedie(mixture):
    torch.manual_seed(0)
    n = 64
    alpha = torch.rand(n, dtype=torch.float64) * 0.9 + 0.05
    sigma = (1 - alpha**2).sqrt()
    x0 = mixture.sample(n).double()
    x_t = alpha[:, None] * x0 + sigma[:, None] * torch.randn_like(x0)
    labels = torch.randint(-1, 2, (n,)) if mixture.labels is not None else None
    exact = mixture.posterior_mean(x_t, alpha, sigma, labels)
    assert torch.allclose(exact, tweedie_x0(mixture, x_t, alpha, sigma, labels), atol=1e-8)


def test_log_prob_normalised_and_sampling_matches():
    mix = ring(4, std=0.3)
    g = torch.linspace(-2, 2, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    mass = mix.log_prob(pts).exp().sum() * (g[1] - g[0]) ** 2
    assert abs(mass.item() - 1) < 1e-3
    x = mix.sample(20000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x.mean(0).double(), torch.zeros(2, dtype=torch.float64), atol=0.02)


@pytest.mark.parametrize("schedule,t", [(VPSchedule(), torch.tensor([300, 700])),
                                        (FlowSchedule(), torch.tensor([0.3, 0.7])),
                                        (EDMSchedule(), torch.tensor([0.3, 2.0]))])
def test_denoiser_uses_schedule(schedule, t):
    mix = build_mixture("grid25")
    den = mixture_denoiser(mix, schedule)
    x0 = mix.sample(2)
    x_t = schedule.add_noise(x0, torch.randn_like(x0), t)
    alpha, sigma = schedule.alpha_sigma(t)
    assert torch.allclose(den(x_t, t), mix.posterior_mean(x_t, alpha, sigma).float())


def test_class_conditioning_and_cfg():
    mix = build_mixture("cond-ring8")
    den = mixture_denoiser(mix, VPSchedule())
    cond = ClassConditioner(2)(torch.tensor([0, 1]))
    x_t, t = torch.zeros(2, 2) + 0.3, torch.tensor([500, 500])
    c = den(x_t, t, cond)
    u = den(x_t, t, cond.__class__(cond.uncond))
    g = den.guided(x_t, t, cond, 3.0)
    assert torch.allclose(g, u + 3.0 * (c - u), atol=1e-6)
    # near t=0 a class-0 prediction lies on a class-0 mode
    x0 = mix.sample(4, class_labels=torch.zeros(4, dtype=torch.long))
    pred = den(x0, torch.zeros(4, dtype=torch.long), ClassConditioner(2)(torch.zeros(4, dtype=torch.long)))
    nearest = torch.cdist(pred.double(), mix.means).argmin(1)
    assert (mix.labels[nearest] == 0).all()
    assert (pred - x0).norm(dim=1).max() < 0.05


def test_explicit_parameters_and_errors():
    mix = build_mixture(means=[[0, 0, 0], [1, 1, 1]], stds=[0.1, 0.2], weights=[1, 3])
    assert mix.dim == 3 and torch.allclose(mix.weights, torch.tensor([0.25, 0.75], dtype=torch.float64))
    with pytest.raises(ValueError):
        build_mixture(means=[0, 1])
    with pytest.raises(ValueError):
        build_mixture(preset="nope")
    img = build_mixture("image4")
    assert img.sample(3).shape == (3, 1, 8, 8)
