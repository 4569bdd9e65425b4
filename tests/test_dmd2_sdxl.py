"""DMD2 on the tiny SDXL pipeline, end to end through the CLI: train, checkpoint, resume, sample, export.

The recipe is the SDXL one in miniature: text conditioning from both encoders with ``add_time_ids``,
all-zero unconditional embeddings for the teacher's CFG (guidance 8), a 2-step student with backward
simulation, TTUR, EMA, and the GAN head on the fake score's mid block with real latents (a
``.safetensors`` of random "latents" and a sibling ``.txt`` of captions).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill import checkpoint as ckpt
from distill.cli import main as cli_main

PROMPTS = ["a photo of a cat", "a red car on a street", "an astronaut riding a horse", "a bowl of fruit"]
CAPTIONS = ["a dog", "a tree", "a house", "the sea", "a bird", "a cup"]


@pytest.fixture(scope="module")
def recipe(tiny_sdxl_dir, tmp_path_factory) -> Path:
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("dmd2_sdxl")
    (d / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    save_file({"latents": torch.randn(len(CAPTIONS), 4, 8, 8, generator=torch.Generator().manual_seed(0))},
              str(d / "real.safetensors"))
    (d / "real.txt").write_text("\n".join(CAPTIONS) + "\n")
    config = {
        "teacher": {"kind": "sdxl", "path": tiny_sdxl_dir, "uncond": "zeros"},
        "student": {"timesteps": [999, 499]},
        "method": {"name": "dmd2", "guidance_scale": 8.0, "generator_every": 2, "gan_generator_weight": 5e-3,
                   "gan_discriminator_weight": 1e-2},
        "data": {"kind": "prompts", "batch_size": 2, "prompts": str(d / "prompts.txt"),
                 "real": str(d / "real.safetensors")},
        "train": {"steps": 5, "log_every": 1, "ema_decay": 0.9},
        "generator_optim": {"lr": 1e-4, "warmup_steps": 2}, "critic_optim": {"lr": 1e-4},
    }
    path = d / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(recipe: Path, out: Path, *args: str) -> None:
    assert cli_main(["train", str(recipe), "--out", str(out), "--no-progress", *args]) == 0


def _latest(run: Path):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1])


@pytest.fixture(scope="module")
def runs(recipe, tmp_path_factory, torch_single_thread):
    """A run trained 3 steps then resumed to 5, and one trained 5 steps straight."""
    root = tmp_path_factory.mktemp("dmd2_sdxl_runs")
    _train(recipe, root / "resumed", "train.steps=3")
    assert [p.name for p in ckpt.list_checkpoints(root / "resumed" / "checkpoints")] == ["step_00000003"]
    _train(recipe, root / "resumed")
    _train(recipe, root / "straight")
    return root / "resumed", root / "straight"


def test_conditioning_is_sdxl_dmd2(recipe, torch_single_thread):
    from distill.build import build_run
    from distill.config import load_config

    models, method, data = build_run(load_config(recipe))
    batch = data(0, slice(0, 2), None)
    cond = batch.cond.kwargs
    assert cond["encoder_hidden_states"].shape == (2, 77, 32 + 48)
    assert cond["added_cond_kwargs"]["text_embeds"].shape == (2, 48)
    assert cond["added_cond_kwargs"]["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert not cond["encoder_hidden_states"].eq(0).all()
    uncond = batch.cond.uncond
    assert uncond["encoder_hidden_states"].eq(0).all() and uncond["added_cond_kwargs"]["text_embeds"].eq(0).all()
    # real latents paired with their own captions, not the generator's prompts
    assert batch.real.shape == (2, 4, 8, 8)
    assert not torch.equal(batch.real_cond.kwargs["encoder_hidden_states"], cond["encoder_hidden_states"])
    assert method.discriminator.feature_module == "mid_block" and method.config.guidance_scale == 8.0
    # CFG 8 on the teacher is one batched [uncond; cond] forward equal to u + 8 (c - u)
    x_t, t = torch.randn(2, 4, 8, 8), torch.tensor([500, 700])
    guided = models.teacher(x_t, t, batch.cond, 8.0)
    c = models.teacher.denoiser(x_t, t, batch.cond)
    u = models.teacher.denoiser(x_t, t, type(batch.cond)(uncond))
    torch.testing.assert_close(guided, u + 8.0 * (c - u), atol=4e-4, rtol=1e-4)  # 8x the fp32 batching noise
    assert (c - u).abs().max() > 1e-2  # the zero uncond branch differs from the prompt


def test_train_checkpoint_resume_matches_straight(runs, tiny_sdxl_dir):
    resumed, straight = runs
    w_res, t_res, s_res = _latest(resumed)
    w_str, t_str, s_str = _latest(straight)
    assert s_res["step"] == s_str["step"] == 5
    assert set(w_res) == {"student", "student_ema", "fake_score", "discriminator"}
    for group, tensors in w_str.items():
        for name, value in tensors.items():
            assert torch.equal(value, w_res[group][name]), f"{group}.{name} differs after resume"
    for name in ("generator", "critic"):
        a, b = t_res["optimizers"][name]["state"], t_str["optimizers"][name]["state"]
        assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    # every loss term was active and finite
    logs = [json.loads(line) for line in (resumed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4, 5]
    gen = [r for r in logs if "loss_dm" in r]
    assert [r["step"] for r in gen] == [1, 3, 5]  # generator at iterations 0, 2, 4 (TTUR 2)
    assert all("loss_g_gan" in r and "loss_d_gan" in r and r["loss_fake"] > 0 for r in gen)
    assert all(torch.isfinite(torch.tensor(v)) for r in logs for k, v in r.items() if k != "time")
    # the student moved away from the teacher's weights
    from safetensors.torch import load_file

    teacher = load_file(str(Path(tiny_sdxl_dir) / "unet" / "diffusion_pytorch_model.safetensors"))
    student = w_str["student"]
    moved = max(float((student[f"denoiser.backbone.{k}"] - v).abs().max()) for k, v in teacher.items())
    assert moved > 1e-5


def test_sample_writes_decoded_pngs(runs, tmp_path, torch_single_thread):
    from PIL import Image

    resumed, _ = runs
    out = tmp_path / "samples"
    assert cli_main(["sample", str(resumed), "--prompt", "a photo of a cat", "--n", "2", "--out", str(out)]) == 0
    files = sorted((out / "images").glob("*.png"))
    assert [f.name for f in files] == ["00000.png", "00001.png"]
    assert (out / "prompts.txt").read_text().splitlines() == ["a photo of a cat"] * 2
    assert Image.open(out / "grid.png").size[0] > 32
    images = [torch.tensor(list(Image.open(f).convert("RGB").getdata()), dtype=torch.float32) for f in files]
    assert Image.open(files[0]).size == (32, 32)  # 8x8 latents through the tiny VAE (scale factor 4)
    assert all(img.std() > 0 for img in images) and not torch.equal(images[0], images[1])


def test_export_full_student_as_lcm_pipeline(runs, tmp_path, torch_single_thread):
    from diffusers import LCMScheduler, StableDiffusionXLPipeline

    resumed, _ = runs
    out = tmp_path / "export"
    assert cli_main(["export", str(resumed), "--out", str(out)]) == 0
    card = json.loads((out / "distill_student.json").read_text())
    assert card["timesteps"] == [999, 499] and card["scheduler"] == "LCMScheduler"
    pipe = StableDiffusionXLPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, LCMScheduler)
    pipe.scheduler.set_timesteps(2)
    assert pipe.scheduler.timesteps.tolist() == [999, 499]
    # the exported UNet is the run's EMA student
    weights, _, _ = _latest(resumed)
    ema = weights["student_ema"]
    for name, value in pipe.unet.state_dict().items():
        assert torch.equal(value, ema[f"denoiser.backbone.{name}"]), name
    latents = pipe("a photo of a cat", num_inference_steps=2, guidance_scale=0.0, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 8) and torch.isfinite(latents).all()


def test_lora_student_exports_lora_weights(recipe, tmp_path, torch_single_thread):
    from diffusers import StableDiffusionXLPipeline

    run = tmp_path / "lora_run"
    _train(recipe, run, "train.steps=1", "student.lora.rank=4", "method.gan_generator_weight=0",
           "method.gan_discriminator_weight=0", "data.real=null", "train.ema_decay=null")
    weights, _, _ = _latest(run)
    assert weights["student"] and all("lora_" in k for k in weights["student"])
    out = tmp_path / "lora_export"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    card = json.loads((out / "distill_student.json").read_text())
    assert card["lora"] is True and card["timesteps"] == [999, 499]
    assert card["scheduler_config"]["original_inference_steps"] == 2

    pipe = StableDiffusionXLPipeline.from_pretrained(yaml.safe_load(recipe.read_text())["teacher"]["path"])
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([999])
    kwargs = dict(encoder_hidden_states=torch.randn(1, 77, 80),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 48),
                                     "time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]])})
    with torch.no_grad():
        before = pipe.unet(x, t, **kwargs).sample
        pipe.load_lora_weights(str(out))
        after = pipe.unet(x, t, **kwargs).sample
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())
    assert not torch.equal(before, after)  # one Adam step moved lora_B off zero
