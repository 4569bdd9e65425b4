"""Parity with diffusers on tiny SDXL / SD1.5 pipelines: our wrappers and samplers give the pipelines' numbers.

* the schedule equals ``DDPMScheduler.alphas_cumprod`` bit for bit;
* our conditioners produce the pipelines' prompt embeddings, pooled embeddings and ``add_time_ids``;
* the Teacher's x0 equals a direct UNet call converted by hand with the scheduler's ``alphas_cumprod``;
* ``sample_ddim`` with CFG reproduces ``StableDiffusion(XL)Pipeline`` + ``DDIMScheduler`` from the same latents;
* ``sample_student`` reproduces an exported student pipeline sampled by ``LCMScheduler`` (METHODS.md Sec. 1).
"""
from __future__ import annotations

import pytest
import torch

from distill.samplers import sample_ddim, sample_student
from distill.models.loading import load_pipeline_components
from distill.models.roles import Student, Teacher
from distill.models.schedules import VPSchedule

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["a photo of a cat", "a red car on a bridge at night"]


def _pipeline(kind: str, folder: str, scheduler: str | None = "ddim"):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    pipe = (StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline).from_pretrained(folder)
    if scheduler == "ddim":
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_pipeline_components(tiny_sdxl_dir), _pipeline("sdxl", tiny_sdxl_dir)


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    return load_pipeline_components(tiny_sd15_dir), _pipeline("sd15", tiny_sd15_dir)


@pytest.fixture(params=["sdxl", "sd15"])
def family(request):
    return request.param, request.getfixturevalue(request.param)


def test_schedule_equals_diffusers_ddpm(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    components = load_pipeline_components(tiny_sdxl_dir, load_vae=False)
    reference = DDPMScheduler.from_config(components.scheduler_config).alphas_cumprod
    assert torch.equal(components.denoiser.schedule.alphas_cumprod, reference)
    assert torch.equal(VPSchedule().alphas_cumprod, DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                                   beta_end=0.012).alphas_cumprod)
    assert components.denoiser.prediction_type == "epsilon"


def test_sdxl_conditioning_matches_pipeline(sdxl):
    components, pipe = sdxl
    cond = components.conditioner(PROMPTS)
    emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True)
    assert torch.equal(cond.kwargs["encoder_hidden_states"], emb)
    assert torch.equal(cond.kwargs["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(cond.uncond["encoder_hidden_states"], neg)  # force_zeros_for_empty_prompt: all zeros
    assert torch.equal(cond.uncond["added_cond_kwargs"]["text_embeds"], neg_pooled)
    # the pipeline's default size is sample_size * vae_scale_factor pixels
    size = (components.resolution, components.resolution)
    assert components.resolution == pipe.default_sample_size * pipe.vae_scale_factor == 32
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert torch.equal(cond.kwargs["added_cond_kwargs"]["time_ids"], time_ids.repeat(len(PROMPTS), 1))


def test_sd15_conditioning_matches_pipeline(sd15):
    components, pipe = sd15
    cond = components.conditioner(PROMPTS)
    emb, neg = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * len(PROMPTS))
    assert torch.equal(cond.kwargs["encoder_hidden_states"], emb)
    assert torch.equal(cond.uncond["encoder_hidden_states"], neg)


def test_teacher_x0_equals_direct_unet_call(family):
    """Teacher(guidance 1) == unet(x_t, t, ...) turned into x0 by hand with the scheduler's alphas_cumprod."""
    from diffusers import DDIMScheduler

    kind, (components, pipe) = family
    teacher = Teacher(components.denoiser, guidance_scale=1.0)
    x_t = torch.randn(components.latent_shape(3), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999, 500, 1])
    cond = components.conditioner(PROMPTS + ["a dog"])

    if kind == "sdxl":
        emb, _, pooled, _ = pipe.encode_prompt(PROMPTS + ["a dog"], device="cpu", do_classifier_free_guidance=False)
        size = (components.resolution,) * 2
        ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=emb.dtype,
                                     text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
        extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.repeat(3, 1)}}
    else:
        emb, _ = pipe.encode_prompt(PROMPTS + ["a dog"], "cpu", 1, False)
        extra = {}
    with torch.no_grad():
        eps = pipe.unet(x_t, t, encoder_hidden_states=emb, **extra).sample
        ours = teacher(x_t, t, cond)
    abar = DDIMScheduler.from_config(pipe.scheduler.config).alphas_cumprod.double()[t].reshape(-1, 1, 1, 1)
    by_hand = ((x_t.double() - (1 - abar).sqrt() * eps.double()) / abar.sqrt()).float()
    assert ours.dtype == torch.float32
    assert (ours - by_hand).abs().max().item() < 1e-5


def test_ddim_cfg_sampler_reproduces_pipeline(family):
    """4-step DDIM with guidance 5 from the same latents: our sampler == the diffusers pipeline (latents)."""
    kind, (components, pipe) = family
    latents = torch.randn(components.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(1))
    kwargs = {} if kind == "sdxl" else {"negative_prompt": [""] * len(PROMPTS)}
    reference = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=5.0,
                     output_type="latent", **kwargs).images
    assert pipe.scheduler.init_noise_sigma == 1.0

    schedule = components.denoiser.schedule
    timesteps = schedule.inference_timesteps(4, "leading", steps_offset=1)
    assert timesteps.tolist() == pipe.scheduler.timesteps.tolist() == [751, 501, 251, 1]
    ours = sample_ddim(Teacher(components.denoiser), latents.clone(), components.conditioner(PROMPTS), timesteps,
                       guidance_scale=5.0, next_timesteps=schedule.ddim_previous(timesteps, final="zero"))
    assert reference.abs().max() > 1.0  # a non-trivial trajectory
    assert (ours - reference).abs().max().item() < 1e-4


def test_lcm_exported_student_reproduces_sample_student(sdxl, tmp_path):
    """A 4-step student exported with an LCMScheduler samples as ``sample_student`` (same generator)."""
    from diffusers import DiffusionPipeline

    from distill.models.export import export_pipeline

    components, _ = sdxl
    timesteps = [999, 749, 499, 249]
    student = Student(components.denoiser, timesteps)
    out = export_pipeline(components.path, student, tmp_path / "student", scheduler="lcm", timesteps=timesteps,
                          guidance_scale=0.0)
    pipe = DiffusionPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "LCMScheduler"
    latents = torch.randn(components.latent_shape(len(PROMPTS)), generator=torch.Generator().manual_seed(2))
    reference = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=0.0,
                     output_type="latent", generator=torch.Generator().manual_seed(3)).images
    assert pipe.scheduler.timesteps.tolist() == timesteps
    ours = sample_student(student, latents.clone(), components.conditioner(PROMPTS),
                          generator=torch.Generator().manual_seed(3))
    # LCM's boundary scalings (c_skip ~ 4e-8 at t=249) are the only difference
    assert (ours - reference).abs().max().item() < 1e-4 * max(1.0, reference.abs().max().item())


def test_tiny_builders_are_deterministic_and_support_time_cond(tmp_path):
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from distill.models.testing import COMMON_WORDS, build_tiny_sdxl

    a = build_tiny_sdxl(tmp_path / "a", seed=3, time_cond_proj_dim=16)
    b = build_tiny_sdxl(tmp_path / "b", seed=3, time_cond_proj_dim=16)
    ua = UNet2DConditionModel.from_pretrained(a, subfolder="unet")
    ub = UNet2DConditionModel.from_pretrained(b, subfolder="unet")
    assert ua.config.time_cond_proj_dim == 16
    assert all(torch.equal(p, q) for p, q in zip(ua.state_dict().values(), ub.state_dict().values()))

    tokenizer = CLIPTokenizer.from_pretrained(a, subfolder="tokenizer")
    assert all(len(tokenizer(word).input_ids) == 3 for word in COMMON_WORDS)  # bos, the word, eos
    assert tokenizer.decode(tokenizer("A zebra, 42!").input_ids, skip_special_tokens=True) == "a zebra , 4 2 !"

    pipe = StableDiffusionXLPipeline.from_pretrained(a)  # the pipeline feeds the guidance embedding itself
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=1, guidance_scale=3.0, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()
