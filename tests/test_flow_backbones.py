"""SD3 / FLUX / Sana adapters on tiny offline pipelines (models/backbones/, models/testing.py).

For each backbone: the tiny pipeline loads with its diffusers class and samples; the adapter's x0 at a given
``(x_t, t, prompt)`` equals the pipeline's own one-step result from ``latents = x_t`` at ``sigma = t`` (its
encode_prompt, transformer call, CFG or guidance embedding, and scheduler step; 1e-5); DMD2 (with the GAN
head on transformer blocks), SiD, SIM and ESD train 3 steps, checkpoint and resume; the export loads with its
pipeline class and the card's call reproduces the toolkit's own student sampling (1e-4).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from distill import checkpoint as ckpt
from distill.cli import main as cli_main

pytestmark = pytest.mark.usefixtures("torch_single_thread")

KINDS = ["sd3", "flux", "sana", "zimage"]
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline", "sana": "SanaPipeline",
             "zimage": "ZImagePipeline"}
PIXELS = {"sd3": 32, "flux": 32, "sana": 32, "zimage": 32}  # tiny resolutions (pipeline defaults are 512-1024)
# the pipelines' guidance_scale for the toolkit's CFG scale 3
# (FLUX: its guidance embedding; Z-Image: pos + w (pos - neg))
PIPELINE_GUIDANCE = {"sd3": 3.0, "flux": 3.5, "sana": 3.0, "zimage": 2.0}
PROMPT = "a photo of a cat"
SEQ = 16  # T5 / Gemma prompt length: short keeps the tiny models fast


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, str]:
    from distill.models import testing

    return {kind: getattr(testing, f"build_tiny_{kind}")(str(tmp_path_factory.mktemp(f"tiny_{kind}")))
            for kind in KINDS}


def _pipe(kind: str, folder: str):
    import diffusers

    pipe = getattr(diffusers, PIPELINES[kind]).from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _extra_call(kind: str) -> dict:
    return {"use_resolution_binning": False, "clean_caption": False} if kind == "sana" else {}


def _latent_out(kind: str, latents: torch.Tensor, chw) -> torch.Tensor:
    if kind == "flux":
        from distill.models.backbones.flux import unpack

        return unpack(latents, chw[1], chw[2])
    return latents


@pytest.mark.parametrize("kind", KINDS)
def test_adapter_x0_equals_the_pipelines_own_step(kind, tiny_dirs):
    from distill.models.backbones.common import load_flow_components
    from distill.models.backbones.flux import pack

    px = PIXELS[kind]
    parts = load_flow_components(tiny_dirs[kind], kind, resolution=px,
                                 conditioner_options={"max_sequence_length": SEQ})
    pipe = parts.pipe
    pipe.set_progress_bar_config(disable=True)
    images = pipe(PROMPT, num_inference_steps=2, height=px, width=px, output_type="pt", max_sequence_length=SEQ,
                  generator=torch.Generator().manual_seed(0), **_extra_call(kind)).images
    assert images.shape == (1, 3, px, px) and torch.isfinite(images).all()

    schedule = parts.denoiser.schedule
    cond = parts.conditioner([PROMPT])
    # SD3 and Sana: CFG (one batched forward of [negative; positive]); FLUX.1-dev: the guidance embedding (3.5)
    scale = 1.0 if kind == "flux" else 3.0
    for t in (0.6, 1.0):
        x_t = torch.randn(1, *parts.chw, generator=torch.Generator().manual_seed(1))
        ours = parts.denoiser.guided(x_t, torch.tensor([t]), cond, scale)
        latents = pack(x_t) if kind == "flux" else x_t
        out = pipe(PROMPT, sigmas=[float(schedule.unshift_time(torch.tensor(t, dtype=torch.float64)))],
                   latents=latents, height=px, width=px, output_type="latent", max_sequence_length=SEQ,
                   guidance_scale=PIPELINE_GUIDANCE[kind], **_extra_call(kind)).images
        assert abs(float(pipe.scheduler.sigmas[0]) - t) < 1e-6  # the pipeline visited the same time
        torch.testing.assert_close(ours, _latent_out(kind, out, parts.chw), atol=1e-5, rtol=0)
    assert (ours - x_t).abs().mean() > 1e-3  # the transformer did something


def _recipe(kind: str, folder: str, method: str, root: Path, timesteps=(1.0,)) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts.txt").write_text("a photo of a cat\na red car on a street\nan astronaut riding a horse\n")
    teacher = {"kind": kind, "path": folder, "resolution": [PIXELS[kind]] * 2, "max_sequence_length": SEQ,
               "gan_blocks": [0, 1]}
    methods = {
        "dmd2": {"name": "dmd2", "guidance_scale": 1.0 if kind == "flux" else 3.0, "generator_every": 2,
                 "gan_generator_weight": 5e-3, "gan_discriminator_weight": 1e-2},
        "sid": {"name": "sid", "alpha": 1.2, "time_distribution": "uniform"},
        "sim": {"name": "sim", "time_distribution": "uniform"},
        "esd": {"name": "esd", "generator_every": 1},
        "consistency": {"name": "consistency", "num_ddim_timesteps": 10, "w_min": 2.0, "w_max": 4.0,
                        "data_source": "student", "target": "ema"},
    }
    data = {"kind": "prompts", "batch_size": 2, "prompts": str(root / "prompts.txt")}
    if method == "dmd2":  # the GAN head needs real latents
        from safetensors.torch import save_file

        from distill.models.backbones.common import load_flow_components

        chw = load_flow_components(folder, kind, resolution=PIXELS[kind]).chw
        save_file({"latents": torch.randn(4, *chw, generator=torch.Generator().manual_seed(0))},
                  str(root / "real.safetensors"))
        data["real"] = str(root / "real.safetensors")
    config = {"teacher": teacher, "student": {"timesteps": list(timesteps)}, "method": methods[method],
              "data": data, "train": {"steps": 3, "log_every": 1},
              "generator_optim": {"lr": 1e-4}, "critic_optim": {"lr": 1e-4}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _train(recipe: Path, out: Path, *overrides: str) -> None:
    assert cli_main(["train", str(recipe), "--out", str(out), "--no-progress", *overrides]) == 0


def _latest(run: Path):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(run / "checkpoints")[-1])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["dmd2", "sid", pytest.param("sim", marks=pytest.mark.slow),
                                    pytest.param("esd", marks=pytest.mark.slow),
                                    pytest.param("consistency", marks=pytest.mark.slow)])
def test_methods_train_checkpoint_and_resume(kind, method, tiny_dirs, tmp_path):
    recipe = _recipe(kind, tiny_dirs[kind], method, tmp_path)
    run = tmp_path / "run"
    _train(recipe, run)
    weights, _, _ = _latest(run)
    trained = "student" if method == "consistency" else "fake_score"  # the critic trains every iteration
    first = {k: v.clone() for k, v in weights[trained].items()}
    _train(recipe, run, "train.steps=4")  # resumes from step 3
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs if "step" in r][-1] == 4
    weights, _, _ = _latest(run)
    moved = sum(float((weights[trained][k] - first[k]).abs().sum()) for k in first)
    assert moved > 0  # the resumed step trained
    if method == "dmd2":
        assert "discriminator" in weights and "loss_g_gan" in json.dumps(logs)


@pytest.mark.parametrize("kind", KINDS)
def test_export_card_reproduces_student_sampling(kind, tiny_dirs, tmp_path):
    from distill.commands import load_run
    from distill.samplers import sample_student

    # FLUX re-noises packed latents in its scheduler, so a multi-step FLUX student draws its noise in another
    # layout; the one-step export is exact there
    timesteps = (1.0,) if kind == "flux" else (1.0, 0.5)
    recipe = _recipe(kind, tiny_dirs[kind], "sid", tmp_path, timesteps)
    run, out = tmp_path / "run", tmp_path / "export"
    _train(recipe, run, "train.steps=2", "train.ema_decay=0.9")  # export and sampling use the EMA weights
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    card = json.loads((out / "distill_student.json").read_text())
    assert card["pipeline_class"] == PIPELINES[kind] and card["call"]["sigmas"] == list(timesteps)
    assert "guidance_scale" in card["call"]
    pipe = _pipe(kind, str(out))
    # SD3 and FLUX draw the scheduler's re-noise from the global RNG (they pass no generator to step()), so
    # both sides draw everything from the global RNG: the initial latents, then one re-noise per step
    torch.manual_seed(5)
    got = pipe(PROMPT, output_type="latent", **card["call"]).images

    _, models = load_run(run)
    cond = models.conditioner([PROMPT])
    torch.manual_seed(5)
    z = torch.randn(1, *models.sample_shape)
    ours = sample_student(models.student, z, cond)
    torch.testing.assert_close(_latent_out(kind, got, models.sample_shape), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("recipe", ["sd35_dmd2_4step", "flux_dmd2_lora", "sana_sid", "sana_lcm", "zimage_dmd2"])
def test_backbone_recipes_run_on_the_tiny_pipelines(recipe, tiny_dirs, tmp_path):
    """Each GPU recipe, pointed at the tiny pipeline of its family (sizes shrunk), builds and trains one step."""
    from distill.config import load_config

    config = load_config(f"recipes/{recipe}.yaml")
    kind = config.teacher.kind
    (tmp_path / "prompts.txt").write_text("a photo of a cat\na dog\n")
    overrides = [f"teacher.path={tiny_dirs[kind]}", f"teacher.resolution=[{PIXELS[kind]},{PIXELS[kind]}]",
                 f"teacher.max_sequence_length={SEQ}", "teacher.gan_blocks=[0]",  # teacher stays the recipes' bf16
                 f"data.prompts={tmp_path / 'prompts.txt'}", "data.batch_size=2", "data.real=null",
                 "train.steps=1", "train.mixed_precision='no'", "train.log_every=1",
                 "method.gan_generator_weight=0.0", "method.gan_discriminator_weight=0.0"]
    if config.method["name"] != "dmd2":
        overrides = overrides[:-2]
    if config.student.lora is not None:
        overrides += ["student.lora.rank=2", "fake_score.lora.rank=2"]
    _train(Path(f"recipes/{recipe}.yaml"), tmp_path / "run", *overrides)
    assert ckpt.list_checkpoints(tmp_path / "run" / "checkpoints")


def test_kind_detection_and_one_line_errors(tiny_dirs):
    from distill.models.backbones.common import adapter_module, detect_flow_kind, flow_kinds, load_flow_components
    from distill.models.errors import ToolkitError

    assert flow_kinds() == sorted(KINDS)
    assert {detect_flow_kind(PIPELINES[k]) for k in KINDS} == set(KINDS)
    assert detect_flow_kind("StableDiffusionXLPipeline") is None  # UNet pipelines keep their own loader
    with pytest.raises(ToolkitError, match="unknown backbone kind"):
        adapter_module("dit9000")
    with pytest.raises(ToolkitError, match="block 7 does not exist"):
        load_flow_components(tiny_dirs["sd3"], "sd3", gan_blocks=[7])
    with pytest.raises(ToolkitError, match="no guidance embedding"):
        from distill.models.backbones import flux

        class NoEmbedding:
            transformer = type("T", (), {"config": type("C", (), {"guidance_embeds": False})()})()

        flux.Conditioner(NoEmbedding(), guidance_embedding=3.5)


@pytest.mark.slow
def test_flux_lora_student_exports_merged(tiny_dirs, tmp_path):
    """A LoRA student (adapters on student and fake score) trains, and its export merges the adapter: the card's
    call equals the toolkit's sampling of the LoRA student even with non-zero adapter weights."""
    from distill.commands import load_run
    from distill.models.backbones.common import export_flow_student
    from distill.samplers import sample_student

    recipe = _recipe("flux", tiny_dirs["flux"], "sid", tmp_path)
    config = yaml.safe_load(recipe.read_text())
    lora = {"rank": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                          "add_v_proj", "to_add_out", "proj_mlp", "proj_out"]}
    config["student"]["lora"] = lora
    config["fake_score"] = {"lora": lora}
    recipe.write_text(yaml.safe_dump(config))
    _train(recipe, tmp_path / "run", "train.steps=2")
    cfg, models = load_run(tmp_path / "run")
    trainable = [n for n, p in models.student.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():  # make the adapter matter
        for n, p in models.student.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    export_flow_student(models, cfg, tmp_path / "export")
    card = json.loads((tmp_path / "export" / "distill_student.json").read_text())
    pipe = _pipe("flux", str(tmp_path / "export"))
    torch.manual_seed(5)
    got = pipe(PROMPT, output_type="latent", **card["call"]).images
    cond = models.conditioner([PROMPT])
    torch.manual_seed(5)
    z = torch.randn(1, *models.sample_shape)
    ours = sample_student(models.student, z, cond)
    torch.testing.assert_close(_latent_out("flux", got, models.sample_shape), ours, atol=1e-4, rtol=0)
    teacher = sample_student(models.teacher.denoiser, z, cond, timesteps=models.student.timesteps)
    assert (teacher - ours).abs().max() > 1e-2  # the merged adapter changed the network


def test_zimage_resolution_past_the_rope_table_is_a_one_line_error(tiny_dirs):
    """On a GPU such a resolution was a device-side assert in an index kernel (seen on an H200); now it is
    refused where the latent shape is computed."""
    from distill.models.backbones.common import load_flow_components
    from distill.models.errors import ToolkitError

    assert load_flow_components(tiny_dirs["zimage"], "zimage", resolution=32).chw[0] > 0
    with pytest.raises(ToolkitError, match="RoPE table"):
        load_flow_components(tiny_dirs["zimage"], "zimage", resolution=1024)
    # captions longer than the table's frame axis (the tiny tokenizer makes > 64 tokens of a short prompt)
    parts = load_flow_components(tiny_dirs["zimage"], "zimage", resolution=32,
                                 conditioner_options={"max_sequence_length": 512})
    x = torch.randn(1, *parts.chw)
    with pytest.raises(ToolkitError, match="RoPE frame position"):
        parts.denoiser(x, torch.tensor([0.5]), parts.conditioner(["a photo of a cat"]))


@pytest.mark.parametrize("kind", ["flux", "sana"])
def test_gradient_checkpointing_reaches_flow_transformers(kind, tiny_dirs, tmp_path):
    """``train.gradient_checkpointing`` turns on the transformer's own checkpointing and changes no loss
    (DMD2 with the GAN head on two blocks: the tap's hooks fire again in backward's recomputation)."""
    import json

    from distill.build import build_run
    from distill.config import load_config

    recipe = _recipe(kind, tiny_dirs[kind], "dmd2", tmp_path / "recipe")
    models, _, _ = build_run(load_config(recipe, ["train.gradient_checkpointing=true"]), warm_start=False)
    from distill.models.export import unwrap_unet

    assert all(unwrap_unet(r).transformer.is_gradient_checkpointing for r in (models.student, models.fake_score))
    logs = []
    for flag in ("false", "true"):
        run = tmp_path / f"run_{flag}"
        _train(recipe, run, f"train.gradient_checkpointing={flag}", "train.steps=2")
        logs.append([json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()])
    keys = {k for line in logs[0] for k in line if k.startswith(("loss", "generator_loss", "critic_loss"))}
    assert keys and any(k.startswith("loss_g_gan") for k in keys)
    for a, b in zip(logs[0], logs[1]):
        for k in keys:
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-5, abs=1e-7), k

@pytest.mark.parametrize("kind", KINDS)
def test_cached_embeddings_rebuild_the_conditioners_own_cond(kind, tiny_dirs):
    """What ``distill encode-prompts`` caches (``embed`` per prompt, ``embed_uncond`` once) gives back the very
    Cond the conditioner builds from the prompts: both branches, masks (Sana, Z-Image), Sana's negative prompt
    (no instruction prefix) and FLUX's guidance embedding included."""
    from distill.models.backbones.common import load_flow_components

    parts = load_flow_components(tiny_dirs[kind], kind, resolution=PIXELS[kind], load_vae=False,
                                 conditioner_options={"max_sequence_length": SEQ})
    conditioner, prompts = parts.conditioner, [PROMPT, "a dog"]
    direct = conditioner(prompts)
    cached = conditioner.from_embeddings({k: v[[1, 0]] for k, v in conditioner.embed(prompts[::-1]).items()},
                                         conditioner.embed_uncond())
    for branch in ("kwargs", "uncond"):
        a, b = getattr(direct, branch), getattr(cached, branch)
        assert sorted(a) == sorted(b)
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (branch, k)
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0)
    assert set(conditioner.fields) <= set(direct.kwargs)
