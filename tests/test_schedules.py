import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, DDIMScheduler

from distill.models.schedules import EDMSchedule, FlowSchedule, VPSchedule, guidance_scale_embedding


@pytest.mark.parametrize("kind,start,end", [("scaled_linear", 0.00085, 0.012), ("linear", 1e-4, 0.02)])
def test_vp_alphas_cumprod_equal_diffusers(kind, start, end):
    ours = VPSchedule(1000, start, end, kind)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=start, beta_end=end, beta_schedule=kind)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.betas, ref.betas)


def test_vp_add_noise_equals_diffusers():
    ours, ref = VPSchedule(), DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, eps = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.allclose(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t), atol=1e-6)


@pytest.mark.parametrize("schedule,t", [
    (VPSchedule(), torch.tensor([0, 10, 500, 999])),
    (FlowSchedule(shift=3.0), torch.tensor([0.01, 0.3, 0.7, 0.99], dtype=torch.float64)),
    (EDMSchedule(), torch.tensor([0.002, 0.5, 10.0, 80.0], dtype=torch.float64)),
])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction", "sample", "flow"])
def test_prediction_conversions_round_trip(schedule, t, prediction):
    x0, eps = torch.randn(4, 3, 5, dtype=torch.float64), torch.randn(4, 3, 5, dtype=torch.float64)
    x_t = schedule.add_noise(x0, eps, t)
    out = schedule.from_x0(x0, x_t, t, prediction)
    assert torch.allclose(schedule.to_x0(out, x_t, t, prediction), x0, atol=1e-8)
    assert torch.allclose(schedule.eps_from_x0(x0, x_t, t), eps, atol=1e-6)


def test_vp_v_prediction_matches_diffusers_definition():
    s = VPSchedule()
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    x0, eps, t = torch.randn(3, 4), torch.randn(3, 4), torch.tensor([5, 400, 990])
    v_ref = ref.get_velocity(x0, eps, t)
    assert torch.allclose(s.from_x0(x0, s.add_noise(x0, eps, t), t, "v"), v_ref, atol=1e-5)


def test_flow_sigmas_equal_diffusers():
    for shift in (1.0, 3.0):
        ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        ref.set_timesteps(8)
        ours = FlowSchedule(shift=shift).inference_timesteps(8)
        assert torch.allclose(ours.float(), ref.sigmas[:-1], atol=1e-6)
        assert torch.allclose(FlowSchedule(shift=shift).model_timestep(ours).float(), ref.timesteps, atol=1e-3)


@pytest.mark.parametrize("spacing,offset", [("leading", 1), ("trailing", 0), ("linspace", 0)])
def test_inference_timesteps_equal_ddim(spacing, offset):
    ref = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    for n in (1, 4, 7, 50):
        ref.set_timesteps(n)
        assert VPSchedule().inference_timesteps(n, spacing, offset).tolist() == ref.timesteps.tolist()


def test_clean_time_and_edm_sigma():
    s = VPSchedule()
    alpha, sigma = s.alpha_sigma(torch.tensor([-1]))
    assert alpha.item() == 1.0 and sigma.item() == 0.0
    t = torch.tensor([100, 625, 999])
    assert torch.equal(s.t_from_edm_sigma(s.edm_sigma(t)), t)
    assert s.t_from_edm_sigma(torch.tensor(2.5)).item() in range(600, 650)  # SiD's sigma_init on SD's schedule


def test_guidance_embedding_matches_diffusers():
    from diffusers.pipelines.latent_consistency_models.pipeline_latent_consistency_text2img import (
        LatentConsistencyModelPipeline)
    w = torch.tensor([3.0, 7.5])
    ref = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=256)
    assert torch.allclose(guidance_scale_embedding(w, 256), ref, atol=1e-5)
