"""Loading teachers from pipeline folders (and the one-line errors), exporting students back to diffusers."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from distill.models.denoiser import Denoiser
from distill.models.errors import ToolkitError
from distill.models.export import export_lora, export_pipeline, export_unet, unwrap_unet
from distill.models.loading import detect_kind, load_pipeline_components, load_unet, resolve_pipeline_dir
from distill.models.roles import LoraSpec, Student, make_trainable

pytestmark = pytest.mark.usefixtures("torch_single_thread")

PROMPTS = ["a photo of a cat", "a dog on the beach"]


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_pipeline_components(tiny_sdxl_dir)


def _inputs(components, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(components.latent_shape(len(PROMPTS)), generator=g)
    return x_t, torch.tensor([800, 200]), components.conditioner(PROMPTS)


def _perturbed_lora(denoiser: Denoiser, rank: int = 4, alpha: float = 8.0) -> Denoiser:
    """A trainable copy with a LoRA whose B weights are non-zero (peft starts B at zero: an identity adapter)."""
    student = make_trainable(denoiser, LoraSpec(rank=rank, alpha=alpha))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in student.backbone.named_parameters():
            if "lora_B" in name:
                param.copy_(0.05 * torch.randn(param.shape, generator=g))
    return student


# ------------------------------------------------------------------------------------------ loading
def test_load_components_round_trip(tiny_sdxl_dir, tiny_sd15_dir, sdxl):
    assert detect_kind(tiny_sdxl_dir) == "sdxl" and detect_kind(tiny_sd15_dir) == "sd15"
    assert sdxl.kind == "sdxl" and sdxl.path == os.path.abspath(tiny_sdxl_dir)
    assert sdxl.vae_scale_factor == 4 and sdxl.latent_size == 8 and sdxl.resolution == 32
    assert sdxl.scaling_factor == pytest.approx(0.13025)
    assert sdxl.conditioner.resolution == (32, 32) and sdxl.conditioner.uncond == "zeros"
    assert sdxl.denoiser.backbone is sdxl.unet and not sdxl.unet.training

    sd15 = load_pipeline_components(tiny_sd15_dir, load_vae=False)
    assert sd15.kind == "sd15" and sd15.vae is None and len(sd15.text_encoders) == 1
    x_t = torch.randn(sd15.latent_shape(2))
    assert sd15.denoiser(x_t, torch.tensor([10, 900]), sd15.conditioner(PROMPTS)).shape == x_t.shape

    # the same weights as diffusers' own loader, in the requested dtype
    from diffusers import UNet2DConditionModel

    reference = UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), sdxl.unet.state_dict().values()))
    half = load_pipeline_components(tiny_sdxl_dir, dtype=torch.bfloat16, load_vae=False, uncond="empty",
                                    resolution=(48, 64))
    assert half.unet.dtype == torch.bfloat16 and half.text_encoders[1].dtype == torch.bfloat16
    assert half.conditioner.resolution == (48, 64)
    x_t, t, _ = _inputs(sdxl)
    out = half.denoiser(x_t, t, half.conditioner(PROMPTS))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def _copy_without(src: str, dst: str, *remove: str) -> str:
    shutil.copytree(src, dst)
    for rel in remove:
        path = os.path.join(dst, rel)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    return dst


def test_missing_folder_error(tmp_path):
    missing = str(tmp_path / "no_such_pipeline")
    with pytest.raises(ToolkitError, match=r"pipeline folder .*no_such_pipeline does not exist") as err:
        load_pipeline_components(missing)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("remove, expected", [
    ("unet/diffusion_pytorch_model.safetensors", r"^unet/diffusion_pytorch_model\.safetensors not found in .*broken "
                                                 r"\(a diffusers pipeline folder: .*unet/, vae/"),
    ("unet", r"^unet/ not found in .*broken"),
    ("text_encoder_2/model.safetensors", r"^text_encoder_2/model\.safetensors not found"),
    ("tokenizer/merges.txt", r"^tokenizer/merges\.txt not found"),
    ("scheduler", r"^scheduler/scheduler_config\.json not found"),
    ("model_index.json", r"^model_index\.json not found in .*broken"),
])
def test_incomplete_folder_errors(tiny_sdxl_dir, tmp_path, remove, expected):
    broken = _copy_without(tiny_sdxl_dir, str(tmp_path / "broken"), remove)
    with pytest.raises(ToolkitError, match=expected) as err:
        load_pipeline_components(broken)
    assert "\n" not in str(err.value)


def test_variant_error_names_the_variant(tiny_sdxl_dir):
    with pytest.raises(ToolkitError, match=r"diffusion_pytorch_model\.fp16\.safetensors not found.*variant 'fp16'"):
        load_pipeline_components(tiny_sdxl_dir, variant="fp16")


def test_hub_id_offline_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    repo = "stabilityai/stable-diffusion-xl-base-1.0"
    with pytest.raises(ToolkitError) as err:
        load_pipeline_components(repo)
    message = str(err.value)
    assert "\n" not in message
    assert repo in message and "HF_HUB_OFFLINE=1" in message and str(tmp_path / "hf_home") in message
    assert f"hf download {repo}" in message and "huggingface-cli download" in message and "HF_HOME" in message
    with pytest.raises(ToolkitError, match="cannot load"):
        resolve_pipeline_dir(repo, cache_dir=str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------ export
def test_export_unet_round_trip(sdxl, tmp_path):
    from diffusers import UNet2DConditionModel

    student = Student(make_trainable(sdxl.denoiser), timesteps=[999])
    assert unwrap_unet(student) is student.denoiser.backbone
    out = export_unet(student, tmp_path / "unet")
    assert sorted(os.listdir(out)) == ["config.json", "diffusion_pytorch_model.safetensors"]
    reloaded = UNet2DConditionModel.from_pretrained(out)
    x_t, t, cond = _inputs(sdxl)
    with torch.no_grad():
        expected = student.denoiser(x_t, t, cond)
        got = Denoiser(reloaded, sdxl.denoiser.schedule)(x_t, t, cond)
    assert torch.equal(got, expected)
    assert load_unet(out).config.addition_embed_type == "text_time"

    from safetensors.torch import load_file

    half = export_unet(student, tmp_path / "unet16", dtype=torch.float16)
    assert {v.dtype for v in load_file(os.path.join(half, "diffusion_pytorch_model.safetensors")).values()} == {
        torch.float16}


def test_export_rejects_non_diffusers_models(tmp_path):
    with pytest.raises(ToolkitError, match="export needs a diffusers model"):
        export_unet(torch.nn.Linear(2, 2), tmp_path / "x")


def test_export_pipeline_loads_in_diffusers(sdxl, tiny_sdxl_dir, tmp_path):
    from diffusers import DiffusionPipeline, StableDiffusionXLPipeline

    student = Student(_perturbed_lora(sdxl.denoiser), timesteps=[399])
    out = export_pipeline(tiny_sdxl_dir, student, tmp_path / "pipe", scheduler="lcm", timesteps=[399],
                          guidance_scale=0.0)
    card = json.load(open(os.path.join(out, "distill_student.json")))
    assert card["timesteps"] == [399] and card["call"] == "timesteps=[399], guidance_scale=0.0"
    pipe = DiffusionPipeline.from_pretrained(out)
    assert isinstance(pipe, StableDiffusionXLPipeline) and type(pipe.scheduler).__name__ == "LCMScheduler"
    assert not any("lora" in name for name, _ in pipe.unet.named_parameters())
    x_t, t, cond = _inputs(sdxl)
    with torch.no_grad():
        expected = student.denoiser(x_t, t, cond)
        got = Denoiser(pipe.unet, sdxl.denoiser.schedule)(x_t, t, cond)
    assert (got - expected).abs().max().item() < 1e-4  # fused LoRA: W + BA in fp32 vs two matmuls
    # the teacher's other components are copied unchanged
    for rel in ("vae/config.json", "tokenizer_2/vocab.json", "model_index.json"):
        with open(os.path.join(tiny_sdxl_dir, rel)) as f, open(os.path.join(out, rel)) as g:
            assert (f.read() == g.read()) == (rel != "model_index.json")  # model_index names the LCMScheduler

    keep = export_pipeline(tiny_sdxl_dir, student, tmp_path / "pipe_keep")
    assert type(DiffusionPipeline.from_pretrained(keep).scheduler).__name__ == "EulerDiscreteScheduler"
    with pytest.raises(ToolkitError, match="overwrite the teacher"):
        export_pipeline(tiny_sdxl_dir, student, tiny_sdxl_dir)


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_lora_export_loads_with_load_lora_weights(kind, tiny_sdxl_dir, tiny_sd15_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    folder = tiny_sdxl_dir if kind == "sdxl" else tiny_sd15_dir
    components = load_pipeline_components(folder, load_vae=False)
    student = _perturbed_lora(components.denoiser, rank=4, alpha=8.0)  # alpha != rank: the scale must survive
    out = export_lora(student, tmp_path / "lora", pipeline=kind)
    assert os.listdir(out) == ["pytorch_lora_weights.safetensors"]

    pipe = (StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline).from_pretrained(folder)
    x_t, t, cond = _inputs(components)
    with torch.no_grad():
        before = Denoiser(pipe.unet, components.denoiser.schedule)(x_t, t, cond)
        pipe.load_lora_weights(out)
        after = Denoiser(pipe.unet, components.denoiser.schedule)(x_t, t, cond)
        expected = student(x_t, t, cond)
    n_ours = sum("lora_A" in n for n, _ in student.backbone.named_parameters())
    n_loaded = sum("lora_A" in n for n, _ in pipe.unet.named_parameters())
    assert n_loaded == n_ours > 0  # every adapted layer (attention, conv, ff, time embedding) came through
    assert (after - before).abs().max().item() > 1e-2
    assert (after - expected).abs().max().item() < 1e-5

    merged = export_lora(student, tmp_path / "merged", merged=True)
    unet = load_unet(merged)
    with torch.no_grad():
        fused = Denoiser(unet, components.denoiser.schedule)(x_t, t, cond)
    assert (fused - expected).abs().max().item() < 1e-4


def test_lora_export_without_adapter_errors(sdxl, tmp_path):
    with pytest.raises(ToolkitError, match="no LoRA adapter 'default'"):
        export_lora(sdxl.unet, tmp_path / "lora")
