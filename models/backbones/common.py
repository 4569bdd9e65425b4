"""What every flow-matching transformer adapter shares: the Denoiser-facing module, loading, schedules, export.

A backbone family is one module in this package (``sd3.py``, ``flux.py``, ``sana.py``, ...) that defines

* ``PIPELINE_CLASS`` (the diffusers pipeline class name) and ``PIPELINE_CLASS_NAMES`` (the
  ``model_index.json`` ``_class_name`` values it reads, for ``teacher.kind: auto``);
* ``Backbone``: a :class:`FlowTransformer` subclass that calls the transformer (time units, packing, ids,
  masks, guidance embedding) and returns the flow velocity in the toolkit's ``[B, C, H, W]`` latent layout;
* ``Conditioner``: prompts -> :class:`~distill.models.conditioning.Cond` through the pipeline's own
  ``encode_prompt`` (conditional branch, and the negative-prompt branch for CFG);
* optionally ``default_resolution(pipe)`` and ``latent_chw(pipe, resolution)`` where they differ from
  :func:`default_resolution` / :func:`latent_chw` here (FLUX and Z-Image pack 2x2 patches), and, where the
  shift depends on the resolution (FLUX), ``image_seq_len(chw)``.

:func:`load_flow_components` and :func:`export_flow_student` work for every such module, found by name
(``teacher.kind``) or by scanning the package (``auto``), so a new family needs no edit here.
The x0 contract: the transformers predict the velocity ``v = eps - x0`` at ``x_t = (1 - t) x0 + t eps``
(rectified flow, SD3 Eq. 1-3), so :class:`~distill.models.denoiser.Denoiser` with ``prediction_type="flow"``
and a :class:`~distill.models.schedules.FlowSchedule` gives ``x0 = x_t - t v``.
"""
from __future__ import annotations

import functools
import importlib
import json
import math
import os
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from distill.models.denoiser import Denoiser
from distill.models.errors import ToolkitError
from distill.models.roles import cast_floating
from distill.models.schedules import FlowSchedule


# ------------------------------------------------------------------------------------------ the module
class FlowTransformer(nn.Module):
    """Base adapter: ``forward(x [B, C, H, W], timestep [B] = t * 1000, **cond) -> velocity [B, C, H, W]``.

    ``mid_block`` is an identity module that receives the image tokens of the transformer blocks chosen
    for the GAN head (``gan_blocks``, indices into :meth:`blocks`; several are concatenated along channels),
    reshaped to ``[B, D, h, w]``; DMD2's discriminator taps ``mid_block`` by default
    (:func:`distill.gan.default_feature_module`), so the head sits on an intermediate block with no change
    to the GAN code. Default block: the middle one.
    """

    #: tokens per side of one latent patch (2 for SD3 and FLUX's 2x2 packing, 1 for Sana)
    patch_size: int = 2

    def __init__(self, transformer: nn.Module, gan_blocks: Sequence[int] | None = None):
        super().__init__()
        self.transformer = transformer
        self.mid_block = nn.Identity()
        n = len(self.blocks())
        chosen = [n // 2] if not gan_blocks else [int(i) for i in gan_blocks]
        for i in chosen:
            if not -n <= i < n:
                raise ToolkitError(f"teacher.gan_blocks: block {i} does not exist; this transformer has {n} blocks")
        self.gan_blocks = sorted(i % n for i in chosen)
        self._grid: tuple[int, int] | None = None
        self._collected: list[torch.Tensor] = []
        for i in self.gan_blocks:  # a partial of a bound method: deepcopy (student / fake score copies) rebinds it
            self.blocks()[i].register_forward_hook(functools.partial(self._block_hook, i))

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """``train.gradient_checkpointing``: diffusers' per-block recomputation in the wrapped transformer.

        The GAN tap's block hooks fire again during backward's recomputation; ``_grid`` is ``None`` then
        (the forward has returned), so they do nothing and the recomputed blocks save what the forward saved."""
        self.transformer.enable_gradient_checkpointing(gradient_checkpointing_func)

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks in forward order."""
        return list(self.transformer.transformer_blocks)

    def _block_hook(self, index: int, module, inputs, output) -> None:
        if self._grid is None:
            return
        h, w = self._grid
        outs = output if isinstance(output, (tuple, list)) else (output,)
        tokens = next((o for o in outs if isinstance(o, torch.Tensor) and o.ndim == 3 and o.shape[1] == h * w), None)
        if tokens is None:
            raise RuntimeError(f"block {index} returned no image tokens ({h}x{w}) for the GAN head")
        self._collected.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w))
        if index == self.gan_blocks[-1]:
            feats, self._collected = torch.cat(self._collected, dim=1), []
            self.mid_block(feats)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, **cond) -> torch.Tensor:
        self._grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        self._collected = []
        # embeddings may come from bf16 text encoders while this copy is fp32 (student, fake score): match it
        dtype = x.dtype
        cond = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in cond.items()}
        try:
            return self.call_transformer(x, timestep.to(torch.float32), **cond)
        finally:
            self._grid, self._collected = None, []

    def call_transformer(self, x: torch.Tensor, timestep: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ conditioning
class FlowConditioner:
    """Base of the adapters' ``Conditioner``: prompts -> :class:`~distill.models.conditioning.Cond`, and the
    embedding cache of ``distill encode-prompts`` (``embed`` / ``embed_uncond`` / ``from_embeddings``).

    A subclass sets ``fields``, the keyword arguments of its ``Backbone`` that come from text (FLUX:
    ``encoder_hidden_states``, ``pooled_projections``), and implements ``_branches(prompts, cfg)``: those
    arguments for the prompts and, when ``cfg``, for the negative prompt (None otherwise), both through the
    pipeline's own ``encode_prompt``. Per-sample arguments that do not come from text (FLUX's guidance
    embedding) come from ``_extras``. Every field is per prompt (padded to a fixed length, never to the
    batch's longest), so an embedding cached alone equals the same prompt encoded within any batch.
    """

    fields: tuple[str, ...] = ()
    pipe: Any = None
    negative_prompt: str = ""
    #: False when the pipeline was loaded without its text encoders (a run on cached embeddings)
    text_encoders_loaded: bool = True

    def _branches(self, prompts: list[str], cfg: bool) -> tuple[dict, dict | None]:
        raise NotImplementedError

    def _extras(self, n: int, device) -> dict:
        return {}

    def _require_text_encoders(self) -> None:
        if not self.text_encoders_loaded:
            raise ToolkitError("the text encoders were not loaded (this run reads cached embeddings from "
                               "`distill encode-prompts`): these prompts have no cached embedding")

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> "Cond":
        from distill.models.conditioning import Cond

        self._require_text_encoders()
        prompts = list(prompts)
        cond, uncond = self._branches(prompts, True)
        extras = self._extras(len(prompts), next(iter(cond.values())).device)
        return Cond({**cond, **extras}, {**uncond, **extras})

    @torch.no_grad()
    def embed(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """``{field: [B, ...]}`` of the prompts (what ``distill encode-prompts`` caches per prompt)."""
        self._require_text_encoders()
        cond, _ = self._branches(list(prompts), False)
        return {k: cond[k] for k in self.fields}

    @torch.no_grad()
    def embed_uncond(self) -> dict[str, torch.Tensor]:
        """``{field: [1, ...]}`` of the unconditional branch (the negative prompt), cached once per set."""
        self._require_text_encoders()
        _, uncond = self._branches([""], True)
        return {k: uncond[k] for k in self.fields}

    def cache_settings(self) -> dict:
        """Settings besides the prompt that shape the cached embeddings; a run must use the same ones."""
        return {"max_sequence_length": int(self.max_sequence_length), "negative_prompt": self.negative_prompt}

    def from_embeddings(self, fields: dict[str, torch.Tensor], uncond: dict[str, torch.Tensor] | None) -> "Cond":
        """A Cond from cached embeddings (``uncond``: :meth:`embed_uncond`'s, batch 1), as ``__call__`` gives it."""
        from distill.models.conditioning import Cond

        if uncond is None:
            raise ToolkitError("this embedding set has no uncond.safetensors (the unconditional branch)")
        cond = {k: fields[k] for k in self.fields}
        first = cond[self.fields[0]]
        n, device = first.shape[0], first.device
        neg = {k: uncond[k].to(device).expand(n, *uncond[k].shape[1:]).contiguous() for k in self.fields}
        extras = self._extras(n, device)
        return Cond({**cond, **extras}, {**neg, **extras})


# ------------------------------------------------------------------------------------------ registry
def adapter_module(kind: str):
    """The adapter module for ``kind`` (``sd3``, ``flux``, ``sana``, ...), or a ToolkitError."""
    if kind.startswith("_") or kind == "common":
        raise ToolkitError(f"unknown backbone kind {kind!r}")
    try:
        module = importlib.import_module(f"distill.models.backbones.{kind}")
    except ModuleNotFoundError:
        raise ToolkitError(f"unknown backbone kind {kind!r}; available: {', '.join(flow_kinds())}") from None
    if not hasattr(module, "Backbone") or not hasattr(module, "PIPELINE_CLASS"):
        raise ToolkitError(f"distill.models.backbones.{kind} is not a flow-transformer adapter")
    return module


def default_resolution(pipe) -> tuple[int, int]:
    """Image (height, width) in pixels the pipeline makes by default: the transformer's ``sample_size`` latents."""
    size = int(pipe.transformer.config.sample_size) * int(pipe.vae_scale_factor)
    return size, size


def latent_chw(pipe, resolution) -> tuple[int, int, int]:
    """Latent (channels, height, width) of an image of ``resolution`` (pixels): one latent pixel per VAE factor."""
    f = int(pipe.vae_scale_factor)
    return int(pipe.transformer.config.in_channels), resolution[0] // f, resolution[1] // f


def flow_kinds() -> list[str]:
    """Names of the adapter modules in this package (those that define ``PIPELINE_CLASS``)."""
    import distill.models.backbones as pkg

    kinds = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name == "common" or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"distill.models.backbones.{info.name}")
        except ImportError:
            continue
        if hasattr(module, "PIPELINE_CLASS"):
            kinds.append(info.name)
    return sorted(kinds)


def detect_flow_kind(class_name: str) -> str | None:
    """The adapter whose ``PIPELINE_CLASS_NAMES`` contains a ``model_index.json`` ``_class_name``, or None."""
    for kind in flow_kinds():
        if class_name in getattr(adapter_module(kind), "PIPELINE_CLASS_NAMES", ()):
            return kind
    return None


# ------------------------------------------------------------------------------------------ schedules
def flow_schedule(scheduler_config: dict, image_seq_len: int | None = None, **options) -> FlowSchedule:
    """The :class:`FlowSchedule` a ``FlowMatchEulerDiscreteScheduler`` config describes at one resolution.

    Static shift: ``shift``. Resolution-dependent shift (FLUX, ``use_dynamic_shifting``): ``mu`` linear in the
    number of image tokens between ``base_image_seq_len`` / ``max_image_seq_len`` (diffusers'
    ``calculate_shift``) and the exponential time shift ``e^mu / (e^mu + 1/t - 1)``, which is the static
    shift formula with ``shift = e^mu``. ``options``: ``time_distribution``, ``logit_mean``, ``logit_std``,
    or ``shift`` to override.
    """
    config = dict(scheduler_config)
    shift = float(config.get("shift", config.get("flow_shift", 1.0)))  # flow_shift: DPM-Solver configs (Sana)
    if config.get("use_dynamic_shifting"):
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ToolkitError("only the exponential dynamic shift (FLUX) is supported")
        if image_seq_len is None:
            raise ToolkitError("this scheduler shifts by resolution (use_dynamic_shifting): the image size is needed")
        base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
        lo, hi = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
        mu = image_seq_len * (hi - lo) / (top - base) + lo - (hi - lo) / (top - base) * base
        shift = math.exp(mu)
    for key in ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
        if config.get(key):
            raise ToolkitError(f"the scheduler config sets {key}, which FlowSchedule does not reproduce")
    options = {k: v for k, v in options.items() if v is not None}
    shift = float(options.pop("shift", shift))
    try:
        return FlowSchedule(shift=shift, num_train_timesteps=int(config.get("num_train_timesteps", 1000)), **options)
    except (TypeError, ValueError) as err:
        raise ToolkitError(f"teacher.schedule: {err}") from None


# ------------------------------------------------------------------------------------------ loading
@dataclass
class FlowComponents:
    """A loaded flow-transformer pipeline, in the shape distill.build expects of ``Models.pipeline``."""

    kind: str
    path: str
    pipe: Any  # the diffusers pipeline object (its transformer is the teacher's)
    vae: Any
    scheduler_config: dict
    denoiser: Denoiser
    conditioner: Any
    chw: tuple[int, int, int]
    resolution: tuple[int, int]
    extras: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per VAE latent pixel (8 for SD3 / FLUX; Sana's DC-AE 32), as the pipeline computes it."""
        return int(self.pipe.vae_scale_factor)

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        return (batch, *self.chw)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor) if self.vae is not None else 1.0

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0) if self.vae is not None else 0.0


def load_flow_components(folder: str, kind: str, dtype: torch.dtype = torch.float32, device="cpu", *,
                         resolution: Sequence[int] | int | None = None, gan_blocks: Sequence[int] | None = None,
                         schedule_options: dict | None = None, conditioner_options: dict | None = None,
                         load_vae: bool = True, load_text_encoders: bool = True) -> FlowComponents:
    """Load a flow-transformer pipeline folder with its diffusers pipeline class and wrap its transformer.

    ``resolution``: image size in pixels (default: the transformer's ``sample_size`` times the VAE factor);
    it fixes the latent shape and, for FLUX, the shift. ``load_text_encoders=False`` leaves the text encoders
    out (a run on cached embeddings from ``distill encode-prompts``; FLUX's T5-XXL alone is ~9 GB in bf16): the
    conditioner then only builds conditioning from embeddings. Raises ToolkitError on a missing file or folder.
    """
    import diffusers

    module = adapter_module(kind)
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise ToolkitError(f"model_index.json not found in {folder} (a diffusers {module.PIPELINE_CLASS} folder)")
    for sub in ("transformer", "scheduler"):
        if not os.path.isdir(os.path.join(folder, sub)):
            raise ToolkitError(f"{sub}/ not found in {folder} (a diffusers {module.PIPELINE_CLASS} folder)")
    pipe_cls = getattr(diffusers, module.PIPELINE_CLASS)
    extra = {} if load_vae else {"vae": None}
    if not load_text_encoders:
        with open(os.path.join(folder, "model_index.json")) as f:
            extra.update({name: None for name in json.load(f) if name.startswith("text_encoder")})
    try:
        pipe = pipe_cls.from_pretrained(folder, dtype=dtype, **extra)
    except (OSError, ValueError) as err:
        raise ToolkitError(f"cannot load {folder} as {module.PIPELINE_CLASS}: {str(err).splitlines()[0]}") from None
    pipe.to(device)
    for name, component in pipe.components.items():
        if isinstance(component, nn.Module):
            component.eval().requires_grad_(False)
    if resolution is None:
        res = getattr(module, "default_resolution", default_resolution)(pipe)
    else:
        res = (int(resolution), int(resolution)) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
    chw = getattr(module, "latent_chw", latent_chw)(pipe, res)
    seq = getattr(module, "image_seq_len", lambda c: None)(chw)
    schedule = flow_schedule(pipe.scheduler.config, seq, **(schedule_options or {}))
    backbone = module.Backbone(pipe.transformer, gan_blocks=gan_blocks)
    denoiser = Denoiser(backbone, schedule, "flow")
    try:
        conditioner = module.Conditioner(pipe, **(conditioner_options or {}))
    except TypeError as err:  # an option another family takes (guidance_embedding is FLUX's)
        raise ToolkitError(f"teacher options do not apply to {kind}: {err}") from None
    conditioner.text_encoders_loaded = load_text_encoders
    return FlowComponents(kind=kind, path=folder, pipe=pipe, vae=getattr(pipe, "vae", None),
                          scheduler_config=dict(pipe.scheduler.config), denoiser=denoiser, conditioner=conditioner,
                          chw=chw, resolution=res)


def load_flow_teacher(tcfg, device=None, load_text_encoders: bool = True) -> FlowComponents | None:
    """The flow-transformer components a recipe's ``teacher`` section names, or None for a UNet pipeline.

    ``teacher.kind``: an adapter name (``sd3``, ``flux``, ``sana``, ...) or ``auto`` (``model_index.json``'s
    ``_class_name``). ``teacher.schedule`` keys other than ``kind`` (``time_distribution``, ``logit_mean``,
    ``logit_std``, ``shift``) adjust the training-time distribution; ``teacher.gan_blocks``,
    ``teacher.guidance_embedding`` (FLUX) and ``teacher.max_sequence_length`` go to the adapter.
    """
    from distill.models.loading import _model_index, resolve_pipeline_dir

    if tcfg.kind not in ("auto", *flow_kinds()):
        return None
    folder = resolve_pipeline_dir(tcfg.path)
    kind = tcfg.kind if tcfg.kind != "auto" else detect_flow_kind(str(_model_index(folder).get("_class_name", "")))
    if kind is None:
        return None
    schedule_options = {k: v for k, v in (tcfg.schedule or {}).items() if k != "kind"}
    conditioner_options = {}
    if getattr(tcfg, "max_sequence_length", None):
        conditioner_options["max_sequence_length"] = tcfg.max_sequence_length
    if getattr(tcfg, "guidance_embedding", None) is not None:
        conditioner_options["guidance_embedding"] = tcfg.guidance_embedding
    # fp32 first: distill.build copies the trainable student / fake score from these weights, then casts the teacher
    parts = load_flow_components(folder, kind, torch.float32, device or "cpu",
                                 resolution=tuple(tcfg.resolution) if tcfg.resolution else None,
                                 gan_blocks=getattr(tcfg, "gan_blocks", None), schedule_options=schedule_options,
                                 conditioner_options=conditioner_options, load_text_encoders=load_text_encoders)
    dtype = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
             "fp16": torch.float16}.get(str(tcfg.dtype))
    if dtype is not None:  # frozen text encoders in the teacher's dtype (FLUX's T5-XXL is 19 GB in fp32)
        for name, component in parts.pipe.components.items():
            if name.startswith("text_encoder") and isinstance(component, nn.Module):
                component.to(dtype)
    return parts


# ------------------------------------------------------------------------------------------ export
def student_scheduler_config(teacher_config: dict, stochastic: bool) -> dict:
    """A ``FlowMatchEulerDiscreteScheduler`` config that uses the sigmas it is given as they are.

    ``shift = 1`` and no dynamic shifting, so ``pipe(..., sigmas=student_times)`` visits exactly the
    student's times; ``stochastic_sampling`` (multi-step students) re-noises each x0 with fresh noise,
    ``(1 - t_next) x0 + t_next n``, which is the toolkit's multi-step student sampler (DMD2 Sec. 4.4).
    """
    config = {k: v for k, v in teacher_config.items() if not k.startswith("_")}
    config.update(shift=1.0, use_dynamic_shifting=False, stochastic_sampling=bool(stochastic),
                  invert_sigmas=False, shift_terminal=None)
    return config


def export_flow_student(models, config, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> str:
    """Write the teacher's pipeline with the student's transformer and a scheduler at the student's exact times.

    Adds ``distill_student.json``, the card: the pipeline class and the keyword arguments of the call that
    reproduces ``distill sample`` (``sigmas`` = the student's times, ``guidance_scale`` explicit: 1 for
    CFG backbones, the guidance embedding for guidance-distilled FLUX). LoRA students are merged.
    """
    import diffusers

    parts = models.pipeline
    module = adapter_module(parts.kind)
    student = models.student
    if student.noise_scale != "unit":
        raise ToolkitError("export needs a student that starts from pure noise (student.noise_scale: unit); "
                           "the pipelines feed unscaled noise at the first sigma")
    times = [float(t) for t in student.timesteps]
    if times[0] != 1.0:
        raise ToolkitError(f"export needs the student's first time to be 1.0 (pure noise), got {times[0]}")
    backbone = student.denoiser.backbone
    # a LoRA student is an adapter on the teacher's shared base (models.roles.AdapterView): fuse only its own
    adapter = getattr(backbone, "adapter", None) or "default"
    backbone = getattr(backbone, "backbone", backbone)
    transformer = backbone.transformer
    if any("lora_" in n for n, _ in transformer.named_parameters()):
        import copy

        transformer = copy.deepcopy(transformer)
        if hasattr(transformer, "fuse_lora"):
            transformer.fuse_lora(adapter_names=[adapter])
            transformer.unload_lora()
        else:
            raise ToolkitError("cannot merge this LoRA student's adapter for export")
    transformer = cast_floating(transformer, dtype)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        student_scheduler_config(parts.scheduler_config, len(times) > 1))
    pipe_cls = getattr(diffusers, module.PIPELINE_CLASS)
    pipe = pipe_cls.from_pretrained(parts.path, transformer=transformer, scheduler=scheduler, dtype=dtype)
    out = os.fspath(out_dir)
    if os.path.abspath(out) == os.path.abspath(parts.path):
        raise ToolkitError("export would overwrite the teacher pipeline; choose another --out")
    pipe.save_pretrained(out, safe_serialization=True)
    call = {"num_inference_steps": len(times), "sigmas": times, "height": parts.resolution[0],
            "width": parts.resolution[1], **module.card_call_kwargs(parts.conditioner)}
    card = {"pipeline_class": module.PIPELINE_CLASS, "teacher": config.teacher.path, "kind": parts.kind,
            "student_times": times, "call": call,
            "usage": f"pipe = {module.PIPELINE_CLASS}.from_pretrained(out); image = pipe(prompt, **card['call'])",
            "note": "multi-step students re-noise with fresh noise (stochastic_sampling); SD3 and FLUX pipelines draw "
                    "it from the global torch RNG, not from `generator`: seed with torch.manual_seed"}
    with open(os.path.join(out, "distill_student.json"), "w") as f:
        json.dump(card, f, indent=2)
    return out
