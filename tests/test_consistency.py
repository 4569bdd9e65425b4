"""Consistency distillation (distill/methods/consistency.py).

* the boundary scalings are LCMScheduler's, the solver grid is LCM's, the teacher's guidance is LCM's form;
* ring8: a 4-step student from ``recipes/toy_ring8_lcm.yaml`` (shortened) reaches the analytic truth;
* the EMA target is checkpointed, so a resumed run equals an uninterrupted one;
* tiny SDXL: a w-conditioned student trains, exports as a diffusers pipeline, and ``StableDiffusionXLPipeline``
  with ``LCMScheduler`` reproduces our multi-step sampler; the LoRA variant exports weights that
  ``load_lora_weights`` applies.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distill.build import build_models, build_run
from distill.config import load_config
from distill.engine import Trainer
from distill.methods.consistency import (ConsistencyDenoiser, ConsistencyDistillation, boundary_scalings,
                                         consistency_distance)
from distill.samplers import sample_student

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
PROMPTS = ["a photo of a cat", "a red car on a bridge at night"]


def _train(config, out_dir, resume=None):
    models, method, data = build_run(config)
    trainer = Trainer(method, data, config.train, config.generator_optim, config.critic_optim, out_dir,
                      resume=resume, progress=False)
    return models, method, trainer, trainer.run()


# ------------------------------------------------------------------------------------------ pieces
def test_boundary_scalings_equal_lcm_scheduler():
    from diffusers import LCMScheduler

    scheduler = LCMScheduler()
    for t in [0, 1, 19, 259, 499, 999]:
        c_skip, c_out = scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        ours = boundary_scalings(torch.tensor(t))
        assert torch.allclose(ours[0], torch.as_tensor(c_skip).double(), rtol=1e-6, atol=0)
        assert torch.allclose(ours[1], torch.as_tensor(c_out).double(), rtol=1e-6, atol=0)
    c_skip, c_out = boundary_scalings(torch.tensor(0))
    assert c_skip == 1 and c_out == 0  # f(x, 0) = x: the consistency boundary condition


def test_grid_guidance_convention_and_losses():
    config = load_config(RECIPES / "toy_ring8_lcm.yaml",
                         ["teacher.preset=cond-ring8", "method.w_min=2.0", "method.w_max=2.0"])
    models = build_models(config, need_fake_score=False)
    method = ConsistencyDistillation(models.teacher, models.student, ConsistencyDistillation.config_class(
        w_min=2.0, w_max=2.0))
    # LCM's skipping-step DDIM grid: 19, 39, ..., 999 with skip 20
    assert method.skip == 20 and method.grid[0] == 19 and method.grid[-1] == 999 and len(method.grid) == 50
    assert isinstance(models.student.denoiser, ConsistencyDenoiser)
    # LCM form x0_c + w (x0_c - x0_u) is this toolkit's guidance scale w + 1
    x, t = torch.randn(8, 2), torch.full((8,), 300)
    cond = models.conditioner(torch.arange(8) % 2)
    lcm = method.teacher_x0(x, t, cond, torch.full((8,), 2.0))
    assert torch.allclose(lcm, models.teacher(x, t, cond, guidance_scale=3.0).float(), atol=1e-6)
    # distances: LCM pseudo-Huber, iCT's c = 0.00054 sqrt(d), L2
    a, b = torch.zeros(4, 2, 8, 8), torch.full((4, 2, 8, 8), 0.1)
    assert consistency_distance(a, b, "huber", 0.001).item() == pytest.approx((0.01 + 1e-6) ** 0.5 - 0.001, rel=1e-5)
    c = 0.00054 * 128**0.5
    assert consistency_distance(a, b, "huber_ict", None).item() == pytest.approx((1.28 + c**2) ** 0.5 - c, rel=1e-5)
    assert consistency_distance(a, b, "l2").item() == pytest.approx(0.01, rel=1e-5)


def test_lognormal_index_sampling_prefers_low_noise():
    config = load_config(RECIPES / "toy_ring8_lcm.yaml", ["method.index_sampling=lognormal"])
    models, method, data = build_run(config)
    batch = data(0, slice(0, 512), None)
    index = method.sample_index(batch)
    assert index.min() >= 0 and index.max() < 50
    assert (index < 10).double().mean() > 0.5  # iCT's P_mean = -1.1 puts most mass at small sigma


# ------------------------------------------------------------------------------------------ toy quality
def test_ring8_four_step_student(tmp_path):
    """A shortened ``toy_ring8_lcm.yaml`` run: the 4-step student is close to the truth (benchmark: tighter)."""
    from distill.metrics.toy import mode_report

    config = load_config(RECIPES / "toy_ring8_lcm.yaml", ["train.steps=2000", "train.log_every=0"])
    models, method, _, logs = _train(config, tmp_path)
    assert logs["loss_cd"] < 1e-3
    g = torch.Generator().manual_seed(123)
    z = torch.randn(4000, 2, generator=g)
    x = sample_student(models.student, z, None, generator=g)
    report = mode_report(x, models.mixture, models.mixture.sample(4000, generator=torch.Generator().manual_seed(7)))
    assert report.energy < 0.005
    assert report.precision > 0.92
    assert report.coverage == 8 and report.max_weight_error < 0.04


def test_resume_restores_the_ema_target(tmp_path):
    """Checkpoint at step 3, resume to 6: student and EMA target equal an uninterrupted 6-step run."""
    overrides = ["train.steps=6", "train.checkpoint_every=3", "train.log_every=0", "data.batch_size=64"]
    config = load_config(RECIPES / "toy_ring8_lcm.yaml", overrides)
    _, whole, _, _ = _train(config, tmp_path / "whole")
    _train(load_config(RECIPES / "toy_ring8_lcm.yaml", overrides + ["train.steps=3"]), tmp_path / "split")
    _, resumed, trainer, _ = _train(config, tmp_path / "split", resume="auto")
    assert trainer.resumed_from is not None and trainer.resumed_from.name == "step_00000003"
    for a, b in zip(whole.student.parameters(), resumed.student.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = whole.extra_state(), resumed.extra_state()
    assert state_a and state_a.keys() == state_b.keys()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    # the target is an EMA: it has moved, but less than the student
    first = dict(whole.student.denoiser.named_parameters())
    assert any(not torch.equal(state_a[f"target.{n}"], first[n]) for n in whole._ema_names)


# ------------------------------------------------------------------------------------------ tiny SDXL
def _sdxl_config(tiny_sdxl_dir, tmp_path, recipe, extra):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return load_config(RECIPES / recipe, [
        f"teacher.path={tiny_sdxl_dir}", "teacher.dtype=float32", "teacher.resolution=null",
        f"data.prompts={prompts}", "data.batch_size=2", "train.steps=3", "train.log_every=0",
        "train.checkpoint_every=0", "train.mixed_precision='no'", "generator_optim.warmup_steps=0", *extra])


def _pipeline(folder, lcm=False):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    if lcm:
        pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_lcm_student_exports_and_matches_lcm_scheduler(tiny_sdxl_dir, tmp_path):
    import json

    from distill.models.export import STUDENT_CARD, export_student

    config = _sdxl_config(tiny_sdxl_dir, tmp_path, "sdxl_lcm.yaml", ["generator_optim.lr=1e-3"])
    models, method, _, logs = _train(config, tmp_path / "run")
    unet = models.student.denoiser.backbone
    assert unet.config.time_cond_proj_dim == 256 and method.target_kind == "ema"
    assert unet.time_embedding.cond_proj.weight.abs().max() > 0  # zero-initialised, then trained
    assert torch.isfinite(torch.tensor(logs["loss_cd"]))

    timesteps = [999, 759, 499, 259]
    w = config.method["sample_w"]
    out = export_student(models, config, tmp_path / "pipe")  # what `distill export` writes
    card = json.loads((Path(out) / STUDENT_CARD).read_text())
    assert card["timesteps"] == timesteps and card["guidance_scale"] == w + 1  # pipelines embed guidance_scale - 1
    pipe = _pipeline(out)
    assert type(pipe.scheduler).__name__ == "LCMScheduler" and pipe.unet.config.time_cond_proj_dim == 256
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    reference = pipe(PROMPTS, latents=latents.clone(), num_inference_steps=4, guidance_scale=w + 1,
                     output_type="latent", generator=torch.Generator().manual_seed(3)).images
    assert pipe.scheduler.timesteps.tolist() == timesteps
    models.student.eval()
    cond = models.conditioner(PROMPTS)
    ours = sample_student(models.student, latents.clone(), cond, generator=torch.Generator().manual_seed(3))
    assert (ours - reference).abs().max().item() <= 1e-4
    # the guidance embedding is live: another w gives another image
    models.student.denoiser.guidance_w = 2.0
    other = sample_student(models.student, latents.clone(), cond, generator=torch.Generator().manual_seed(3))
    assert (other - ours).abs().max().item() > 1e-5


def test_sdxl_lcm_lora_exports_weights_that_diffusers_loads(tiny_sdxl_dir, tmp_path):
    from distill.models.export import export_lora

    config = _sdxl_config(tiny_sdxl_dir, tmp_path, "sdxl_lcm_lora.yaml",
                          ["student.lora.rank=4", "generator_optim.lr=1e-2"])
    models, method, _, _ = _train(config, tmp_path / "run")
    assert method.target is None and method.target_kind == "online"
    out = export_lora(models.student, tmp_path / "lora")
    assert (Path(out) / "pytorch_lora_weights.safetensors").is_file()

    pipe = _pipeline(tiny_sdxl_dir, lcm=True)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))

    def run():
        return pipe(PROMPTS, latents=latents.clone(), timesteps=[999, 759, 499, 259], guidance_scale=1.0,
                    output_type="latent", generator=torch.Generator().manual_seed(3)).images

    before = run()
    pipe.load_lora_weights(out)
    after = run()
    assert (after - before).abs().max().item() > 1e-3
    models.student.eval()
    ours = sample_student(models.student, latents.clone(), models.conditioner(PROMPTS),
                          generator=torch.Generator().manual_seed(3))
    assert (ours - after).abs().max().item() <= 1e-4


def test_data_free_source_runs_without_real_data(tiny_sdxl_dir, tmp_path):
    """``data_source: real`` without data is a clear error; ``student`` needs none."""
    from distill.models.errors import ToolkitError

    config = _sdxl_config(tiny_sdxl_dir, tmp_path, "sdxl_lcm_lora.yaml", ["student.lora.rank=4",
                                                                           "method.data_source=real"])
    models, method, data = build_run(config)
    batch = data(0, slice(0, 2), None)
    with pytest.raises(ToolkitError, match="data_source"):
        method.generator_loss(batch)
    method.config.data_source = "student"
    loss, logs = method.generator_loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in method.generator_parameters())


def test_ema_target_is_sharded_with_the_student_under_fsdp(tiny_sdxl_dir, tmp_path):
    """recipes/sdxl_lcm.yaml with train.parallel=fsdp (one process): the EMA target network is sharded like the
    student, so its update lerps shard into shard (an unsharded target raised a Tensor/DTensor mix at step 1),
    and a run resumed from the sharded checkpoint goes on with a sharded target."""
    from unittest import mock

    from distill.cli import main
    from distill.parallel import is_sharded

    (tmp_path / "prompts.txt").write_text("a cat\na dog\n")
    args = ["train", "recipes/sdxl_lcm.yaml", "--out", str(tmp_path / "run"), "--no-progress",
            f"teacher.path={tiny_sdxl_dir}", "teacher.resolution=[128,128]", f"data.prompts={tmp_path / 'prompts.txt'}",
            "data.batch_size=2", "train.parallel=fsdp", "train.mixed_precision='no'"]
    assert main([*args, "train.steps=2"]) == 0
    seen, run = {}, Trainer.run

    def keep(self):
        seen["trainer"] = self
        return run(self)

    with mock.patch.object(Trainer, "run", keep):
        assert main([*args, "train.steps=3"]) == 0
    trainer = seen["trainer"]
    assert trainer.resumed_from is not None and trainer.step == 3
    target = dict(trainer.method.target.named_parameters())
    online = dict(trainer.method.student.denoiser.named_parameters())
    assert target and all(is_sharded(p) and p.placements == online[n].placements for n, p in target.items())
