"""Load a teacher from a diffusers pipeline: a Hub repo id or a local folder, with one-line errors.

:func:`load_pipeline_components` returns the pieces distillation needs (UNet, VAE, scheduler config, an
x0 :class:`~models.denoiser.Denoiser` and the text conditioner) without building a diffusers pipeline
object. Each component is read with ``from_pretrained(folder, subfolder=...)`` after checking that its
files exist, so a missing file, an offline machine or an uncached repo gives a :class:`ToolkitError`
that names what is missing and where it was looked for, instead of a long traceback.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from distill.models.conditioning import SD15Conditioner, SDXLConditioner
from distill.models.denoiser import Denoiser
from distill.models.errors import ToolkitError
from distill.models.schedules import VPSchedule, canonical_prediction_type

PIPELINE_LAYOUT = "a diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/"
KINDS = ("sdxl", "sd15", "unet2d")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

#: weight file names, preferred first (``{v}`` is ``.variant`` or empty)
_DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model{v}.safetensors", "diffusion_pytorch_model{v}.safetensors.index.json",
                      "diffusion_pytorch_model{v}.bin", "diffusion_pytorch_model{v}.bin.index.json")
_TRANSFORMERS_WEIGHTS = ("model{v}.safetensors", "model{v}.safetensors.index.json", "pytorch_model{v}.bin",
                         "pytorch_model{v}.bin.index.json")


@dataclass
class PipelineComponents:
    """What a distillation run needs from a text-to-image pipeline.

    ``denoiser`` wraps ``unet`` (same module) with the scheduler's VP schedule and prediction type;
    ``conditioner`` turns prompts into a :class:`~models.conditioning.Cond` for it.
    """

    kind: str
    path: str
    unet: Any
    vae: Any
    scheduler_config: dict
    denoiser: Denoiser
    conditioner: SDXLConditioner | SD15Conditioner
    tokenizers: tuple = field(default_factory=tuple)
    text_encoders: tuple = field(default_factory=tuple)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel (8 for SD/SDXL), as the pipelines compute it."""
        if self.vae is None:
            return 8
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        """Default latent height/width (the UNet's ``sample_size``: 128 for SDXL, 64 for SD1.5)."""
        return int(self.unet.config.sample_size)

    @property
    def resolution(self) -> int:
        """Default image size in pixels (``latent_size * vae_scale_factor``)."""
        return self.latent_size * self.vae_scale_factor

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, int(self.unet.config.in_channels), self.latent_size, self.latent_size)

    @property
    def scaling_factor(self) -> float:
        """The VAE's latent scaling (``latents = vae.encode(x).latent_dist.sample() * scaling_factor``)."""
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0


# ------------------------------------------------------------------------------------------ resolving
def _offline() -> bool:
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.HF_HUB_OFFLINE) or env.upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache(cache_dir: str | None) -> str:
    from huggingface_hub import constants

    if cache_dir:
        return os.fspath(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def is_repo_id(path_or_repo: str) -> bool:
    """A Hub id (``owner/name``) rather than a local path: no such folder here and the id pattern fits."""
    return not os.path.exists(path_or_repo) and bool(_REPO_ID.match(path_or_repo))


def resolve_pipeline_dir(path_or_repo: str | os.PathLike, *, variant: str | None = None,
                         revision: str | None = None, cache_dir: str | None = None,
                         local_files_only: bool | None = None) -> str:
    """A local pipeline folder: ``path_or_repo`` itself, or the Hub snapshot in the cache (downloading if allowed).

    Only the files the pipeline needs are fetched (``DiffusionPipeline.download``). ``HF_HUB_OFFLINE=1``
    or ``local_files_only=True`` use the cache only.
    """
    path = os.path.expanduser(os.fspath(path_or_repo))  # recipes may name ~/.cache/distill/...
    if os.path.isdir(path):
        return os.path.abspath(path)
    if os.path.exists(path):
        raise ToolkitError(f"{path} is a file, not {PIPELINE_LAYOUT}")
    if not is_repo_id(path):
        raise ToolkitError(f"pipeline folder {path} does not exist (expected {PIPELINE_LAYOUT})")
    from diffusers import DiffusionPipeline

    offline = _offline() or bool(local_files_only)
    cache = _hub_cache(cache_dir)
    try:
        return os.fspath(DiffusionPipeline.download(path, variant=variant, revision=revision, cache_dir=cache_dir,
                                                    local_files_only=offline or None, use_safetensors=None))
    except Exception as err:  # hub / network errors come in many types; all mean "not available here"
        why = "HF_HUB_OFFLINE=1 and it is not in the cache" if offline else \
            f"not in the cache and the Hub is unreachable ({type(err).__name__})"
        raise ToolkitError(
            f"cannot load {path!r}: {why} (cache: {cache}); on a connected machine run "
            f"`hf download {path}` (older huggingface_hub: `huggingface-cli download {path}`) and point HF_HOME "
            f"here at that cache, or pass a local pipeline folder") from err


def _model_index(folder: str) -> dict:
    index = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index):
        raise ToolkitError(f"model_index.json not found in {folder} ({PIPELINE_LAYOUT})")
    with open(index) as f:
        return json.load(f)


def detect_kind(folder: str) -> str:
    """``"sdxl"``, ``"sd15"`` or ``"unet2d"`` from ``model_index.json`` (its ``_class_name`` and components)."""
    from distill.models.backbones.unet2d import is_unet2d_pipeline

    index = _model_index(folder)
    if is_unet2d_pipeline(index):
        return "unet2d"
    name = str(index.get("_class_name", ""))
    if "XL" in name or index.get("text_encoder_2", [None])[0] is not None:
        return "sdxl"
    if name.startswith(("StableDiffusion", "LatentConsistencyModel")) or "text_encoder" in index:
        return "sd15"
    raise ToolkitError(f"cannot tell the model family of {folder}: model_index.json names {name!r}; "
                       f"pass kind= one of {KINDS}")


def _require(folder: str, subfolder: str, candidates: tuple[str, ...], variant: str | None) -> None:
    """Raise a one-line error naming the first expected file when none of ``candidates`` exists."""
    sub = os.path.join(folder, subfolder) if subfolder else folder
    layout = PIPELINE_LAYOUT if subfolder else "a diffusers model folder: config.json and weights"
    if not os.path.isdir(sub):
        raise ToolkitError(f"{subfolder}/ not found in {folder} ({layout})")
    v = f".{variant}" if variant else ""
    names = [c.format(v=v) for c in candidates]
    if not any(os.path.isfile(os.path.join(sub, n)) for n in names):
        hint = f" (variant {variant!r}: leave variant unset for full-precision files)" if variant else ""
        shown = f"{subfolder}/{names[0]}" if subfolder else names[0]
        raise ToolkitError(f"{shown} not found in {folder}{hint} ({layout})")


def _require_model(folder: str, subfolder: str, weights: tuple[str, ...], variant: str | None) -> None:
    _require(folder, subfolder, ("config.json",), None)
    _require(folder, subfolder, weights, variant)


def _require_tokenizer(folder: str, subfolder: str) -> None:
    sub = os.path.join(folder, subfolder)
    if os.path.isfile(os.path.join(sub, "tokenizer.json")):
        return
    _require(folder, subfolder, ("vocab.json",), None)
    _require(folder, subfolder, ("merges.txt",), None)


# ------------------------------------------------------------------------------------------ building
def load_scheduler_config(folder: str) -> dict:
    path = os.path.join(folder, "scheduler", "scheduler_config.json")
    if not os.path.isfile(path):
        raise ToolkitError(f"scheduler/scheduler_config.json not found in {folder} ({PIPELINE_LAYOUT})")
    with open(path) as f:
        return json.load(f)


def schedule_from_scheduler_config(config: dict) -> tuple[VPSchedule, str]:
    """The VP schedule and prediction type a diffusers scheduler config describes (DDPM-family only)."""
    if config.get("trained_betas") is not None:
        raise ToolkitError("the scheduler config uses trained_betas, which VPSchedule does not support")
    if config.get("rescale_betas_zero_snr"):
        raise ToolkitError("the scheduler config sets rescale_betas_zero_snr, which VPSchedule does not support")
    try:
        schedule = VPSchedule.from_scheduler_config(config)
        prediction_type = canonical_prediction_type(config.get("prediction_type", "epsilon"))
    except ValueError as err:
        raise ToolkitError(f"unsupported scheduler config: {err}") from err
    return schedule, prediction_type


def denoiser_from_unet(unet, scheduler_config: dict) -> Denoiser:
    """An x0 :class:`Denoiser` around ``unet`` with the schedule and prediction type of ``scheduler_config``."""
    schedule, prediction_type = schedule_from_scheduler_config(scheduler_config)
    return Denoiser(unet, schedule, prediction_type)


def load_unet(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              variant: str | None = None):
    """A ``UNet2DConditionModel`` from a pipeline folder (``unet/``) or a bare UNet folder (an exported student)."""
    from diffusers import UNet2DConditionModel

    folder = os.fspath(path)
    if os.path.isfile(os.path.join(folder, "config.json")):
        _require(folder, "", _DIFFUSERS_WEIGHTS, variant)
        return UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype, variant=variant).to(device)
    folder = resolve_pipeline_dir(folder, variant=variant)
    _require_model(folder, "unet", _DIFFUSERS_WEIGHTS, variant)
    return UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, variant=variant).to(device)


def load_pipeline_components(path_or_repo: str | os.PathLike, kind: str = "auto", dtype: torch.dtype = torch.float32,
                             device: str | torch.device = "cpu", *, vae_dtype: torch.dtype = torch.float32,
                             load_vae: bool = True, variant: str | None = None, revision: str | None = None,
                             cache_dir: str | None = None, uncond: str = "zeros",
                             resolution: int | tuple[int, int] | None = None,
                             load_text_encoders: bool = True) -> PipelineComponents:
    """Load the UNet, VAE, text encoders and scheduler config of an SDXL or SD1.x pipeline.

    Args:
        path_or_repo: a local pipeline folder or a Hub repo id (``stabilityai/stable-diffusion-xl-base-1.0``).
        kind: ``"auto"`` (from ``model_index.json``), ``"sdxl"`` or ``"sd15"``.
        dtype: UNet and text encoder dtype (bf16 for a teacher). ``vae_dtype``: the SDXL VAE overflows in fp16.
        uncond: SDXL's unconditional branch, ``"zeros"`` (DMD2, the pipeline's default) or ``"empty"``.
        resolution: SDXL ``add_time_ids`` size in pixels; default ``unet.sample_size * vae_scale_factor``
            (what the pipeline uses when called without height/width).
        load_text_encoders: False skips the tokenizers and text encoders (a run that reads cached embeddings
            from ``distill encode-prompts``); the conditioner then only builds conditioning from embeddings.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = resolve_pipeline_dir(path_or_repo, variant=variant, revision=revision, cache_dir=cache_dir)
    if kind == "auto":
        kind = detect_kind(folder)
    if kind not in KINDS:
        raise ToolkitError(f"unknown model kind {kind!r}; expected 'auto' or one of {KINDS}")
    if kind == "unet2d":  # pixel-space UNet2DModel (no VAE, class labels): its own adapter
        from distill.models.backbones.unet2d import load_unet2d_components

        return load_unet2d_components(folder, dtype, device, variant)
    sdxl = kind == "sdxl"
    encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    tokenizer_dirs = ("tokenizer", "tokenizer_2") if sdxl else ("tokenizer",)

    # check every file first, so a broken folder fails before anything heavy is read
    _model_index(folder)
    _require_model(folder, "unet", _DIFFUSERS_WEIGHTS, variant)
    if load_vae:
        _require_model(folder, "vae", _DIFFUSERS_WEIGHTS, variant)
    if not load_text_encoders:
        encoders, tokenizer_dirs = (), ()
    for sub in encoders:
        _require_model(folder, sub, _TRANSFORMERS_WEIGHTS, variant)
    for sub in tokenizer_dirs:
        _require_tokenizer(folder, sub)
    scheduler_config = load_scheduler_config(folder)

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, variant=variant)
    unet.to(device).eval()
    vae = None
    if load_vae:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=vae_dtype, variant=variant)
        vae.to(device).eval().requires_grad_(False)
    tokenizers = tuple(CLIPTokenizer.from_pretrained(folder, subfolder=sub) for sub in tokenizer_dirs)
    classes = (CLIPTextModel, CLIPTextModelWithProjection) if sdxl else (CLIPTextModel,)
    text_encoders = tuple(cls.from_pretrained(folder, subfolder=sub, dtype=dtype, variant=variant)
                          for cls, sub in zip(classes, encoders))
    for encoder in text_encoders:
        encoder.to(device).eval().requires_grad_(False)

    denoiser = denoiser_from_unet(unet, scheduler_config)
    # without text encoders the conditioner gets None for each and builds Conds from cached embeddings only
    toks, encs = (tokenizers, text_encoders) if load_text_encoders else ((None,) * (1 + sdxl),) * 2
    if sdxl:
        if resolution is None:
            scale = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
            resolution = int(unet.config.sample_size) * scale
        size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
        conditioner = SDXLConditioner(toks[0], toks[1], encs[0], encs[1], resolution=size, uncond=uncond)
    else:
        conditioner = SD15Conditioner(toks[0], encs[0])
    return PipelineComponents(kind=kind, path=folder, unet=unet, vae=vae, scheduler_config=dict(scheduler_config),
                              denoiser=denoiser, conditioner=conditioner, tokenizers=tokenizers,
                              text_encoders=text_encoders)
