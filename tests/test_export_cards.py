"""``distill export --format pipeline|unet|lora`` and ``distill sample --prompts`` on one LoRA DMD2 run.

All three formats of the same student give the run's images through the call their cards name, for the
trained number of steps and for fewer (``--steps K`` picks timesteps as LCMScheduler does); the scheduler
carries the student's boundary scalings; the CLI writes images named by prompt index, a grid and the prompts.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.cli import main as cli_main
from distill.models.errors import ToolkitError

pytestmark = pytest.mark.usefixtures("torch_single_thread")

RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "sdxl_dmd2_lora.yaml"
PROMPTS = ["a photo of a cat", "a red car on a street", "a bowl of fruit"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl_dir):
    root = tmp_path_factory.mktemp("cards")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"caption": p, "id": i}) + "\n" for i, p in enumerate(PROMPTS)))
    out = root / "run"
    assert cli_main(["train", str(RECIPE), "--out", str(out), "--no-progress", f"teacher.path={tiny_sdxl_dir}",
                     f"data.prompts={root / 'prompts.jsonl'}", "data.real=null", "data.resolution=32",
                     "data.batch_size=2", "train.steps=1", "train.mixed_precision='no'",
                     # LoRA roles train on the teacher's own base: an fp32 base, so the fp32 pipeline the card loads
                     # reproduces the run exactly (a bf16 base agrees to bf16 rounding, ~4e-3 on these images)
                     "teacher.dtype=float32", "student.lora.rank=4", "fake_score.lora.rank=4",
                     "method.gan_generator_weight=0", "method.gan_discriminator_weight=0",
                     "generator_optim.lr=1e-2", "generator_optim.warmup_steps=0"]) == 0
    return out, root / "prompts.jsonl"


@pytest.fixture(scope="module")
def reference(run):
    from distill.commands import load_run
    from distill.sample_text import sample_run_images

    _, models = load_run(run[0])
    return {k: sample_run_images(models, PROMPTS, seed=5, steps=k, batch_size=2) for k in (4, 2)}


@pytest.mark.parametrize("fmt", ["lora", "pipeline", "unet"])
def test_every_format_reproduces_the_run(fmt, run, reference, tmp_path):
    from distill.models.cards import load_card
    from distill.sample_text import sample_export_images

    out = tmp_path / fmt
    assert cli_main(["export", str(run[0]), "--out", str(out), "--format", fmt]) == 0
    card = load_card(out)
    assert card["format"] == fmt and card["call_kwargs"]["guidance_scale"] == 0.0
    assert card["call_kwargs"]["num_inference_steps"] == 4  # LCMScheduler alone gives 999, 749, 499, 249
    assert card["scheduler_config"]["original_inference_steps"] == 4
    assert card["scheduler_config"]["timestep_scaling"] == 1.0e6  # DMD2 outputs its x0: no boundary blend
    assert card["steps_accepted"]["2"] == {"num_inference_steps": 2}
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == "LCMScheduler" and scheduler["timestep_scaling"] == 1.0e6
    readme = (out / "README.md").read_text()
    assert "guidance_scale=0.0" in readme and "| 2 | `num_inference_steps=2` |" in readme
    assert (fmt == "lora") == (out / "pytorch_lora_weights.safetensors").is_file()
    for steps in (4, 2):
        images = sample_export_images(out, card, PROMPTS, seed=5, steps=steps, batch_size=3)
        assert (images - reference[steps]).abs().max().item() < 1e-4
    assert (reference[4] - reference[2]).abs().max() > 1e-3


def test_sample_cli_from_run_and_export_write_the_same_pngs(run, tmp_path):
    from PIL import Image

    run_dir, prompts = run
    export = tmp_path / "export"
    assert cli_main(["export", str(run_dir), "--out", str(export)]) == 0
    for source, out in ((run_dir, tmp_path / "a"), (export, tmp_path / "b")):
        assert cli_main(["sample", str(source), "--prompts", str(prompts), "--out", str(out), "--seed", "5",
                         "--batch-size", "2", "--device", "cpu"]) == 0
        assert sorted(p.name for p in (out / "images").iterdir()) == ["00000.png", "00001.png", "00002.png"]
        assert (out / "prompts.txt").read_text().splitlines() == PROMPTS
        assert Image.open(out / "grid.png").size == (2 * 32 + 3 * 2, 2 * 32 + 3 * 2)  # 2x2 grid, 2 px padding
    for i in range(3):
        a = np.asarray(Image.open(tmp_path / "a" / "images" / f"{i:05d}.png"), dtype=np.int16)
        b = np.asarray(Image.open(tmp_path / "b" / "images" / f"{i:05d}.png"), dtype=np.int16)
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 0.01  # 1e-4 apart before rounding to uint8


def test_card_details_for_other_students(tiny_sdxl_dir, tmp_path):
    """SiD's sigma-scaled input noise becomes ``latents=``; a consistency student keeps its scalings;
    ``--format lora`` on a full student is a user error."""
    from distill.build import build_models
    from distill.config import load_config
    from distill.models.cards import card_code
    from distill.models.export import export_student

    base = [f"teacher.path={tiny_sdxl_dir}", "teacher.resolution=null", "data.resolution=32"]
    sid = load_config(Path(RECIPE).with_name("sdxl_sid.yaml"), base)
    models = build_models(sid, need_fake_score=False)
    with pytest.raises(ToolkitError, match="--format lora needs a LoRA student"):
        export_student(models, sid, tmp_path / "x", fmt="lora")
    card = json.loads((Path(export_student(models, sid, tmp_path / "sid", fmt="unet")) / "distill_student.json")
                      .read_text())
    sigma = float(models.student.input_from_noise(torch.ones(1, dtype=torch.float64)))
    assert card["latents_scale"] == pytest.approx(sigma) and 0.9 < sigma < 1.0  # sqrt(1 - abar_625)
    assert card["timesteps"] == [625] and card["call_kwargs"]["guidance_scale"] == 0.0
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(card["scheduler_config"])  # original_inference_steps 626: 1 step is 625
    scheduler.set_timesteps(card["call_kwargs"]["num_inference_steps"])
    assert scheduler.timesteps.tolist() == [625]
    code = card_code(card, str(tmp_path / "sid"))
    assert f"latents = torch.randn((1, 4, 8, 8), generator=generator) * {sigma!r}" in code
    assert "latents=latents" in code and "UNet2DConditionModel.from_pretrained" in code

    lcm = load_config(Path(RECIPE).with_name("sdxl_lcm.yaml"), base + ["method.sigma_data=0.25"])
    models = build_models(lcm, need_fake_score=False)
    card = json.loads((Path(export_student(models, lcm, tmp_path / "lcm")) / "distill_student.json").read_text())
    # LCMScheduler fixes sigma_data = 0.5; the scalings depend on t * timestep_scaling / sigma_data only
    assert card["scheduler_config"]["timestep_scaling"] == pytest.approx(10.0 * 0.5 / 0.25)
    assert card["call_kwargs"]["guidance_scale"] == lcm.method["sample_w"] + 1
    assert card["scheduler_config"]["original_inference_steps"] == 50
    assert card["steps_accepted"]["3"] == {"timesteps": [999, 759, 499]}  # LCM's own 3 steps differ


def test_user_errors_come_before_any_model_loads(run, tmp_path, capsys):
    from distill.config import load_config, save_config

    full = tmp_path / "full_run"  # a run folder of a full-UNet student (config only: nothing may load)
    full.mkdir()
    save_config(load_config(Path(RECIPE).with_name("sdxl_dmd2_4step.yaml")), full / "config.yaml")
    cases = [(["export", str(full), "--out", str(tmp_path / "e"), "--format", "lora"], "--format lora needs a LoRA"),
             (["sample", str(run[0]), "--prompts", str(run[1]), "--out", str(tmp_path / "s"), "--steps", "5"],
              "--steps must be between 1 and 4"),
             (["sample", str(run[0]), "--prompts", str(tmp_path / "none.txt"), "--out", str(tmp_path / "s")],
              "prompt file not found"),
             (["sample", str(run[0]), "--prompts", str(run[1]), "--out", str(tmp_path / "s"), "--device", "tpu:x"],
              "is not a device")]
    for args, message in cases:
        assert cli_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err
