"""The one place that turns a :class:`~distill.config.Config` into models, a method and data.

Order matters for large teachers: trainable copies (student, fake score) are made from the fp32
weights before the teacher is cast to bf16, so the student does not start from rounded weights.
When the teacher is an analytic mixture, the student and fake score are small toy nets; the fake score
can be fitted to the teacher first (``fake_score.pretrain_steps``), the analogue of "start from the
teacher's weights".
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distill.config import Config, LoraConfig, NetConfig, from_dict
from distill.models.denoiser import Denoiser
from distill.models.errors import ToolkitError
from distill.models.roles import FakeScore, LoraSpec, Student, Teacher, add_lora, make_trainable, share_lora_base
from distill.models.schedules import build_schedule

#: method name -> "module:Class"
METHODS = {
    "dmd2": "distill.methods.dmd2:DMD2",
    "sid": "distill.methods.sid:SiD",
    "sim": "distill.methods.sim:SIM",
    "esd": "distill.methods.esd:ESD",
    "consistency": "distill.methods.consistency:ConsistencyDistillation",
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def method_class(name: str):
    if name not in METHODS:
        raise ToolkitError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    module, cls = METHODS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as err:
        raise ToolkitError(f"method {name!r} is not available in this version ({err})") from None


def method_config(config: Config):
    """The method's own dataclass from the recipe's ``method:`` section (minus ``name``)."""
    cls = method_class(config.method["name"])
    options = {k: v for k, v in config.method.items() if k != "name"}
    return from_dict(cls.config_class, options, "method.")


@dataclass
class Models:
    """Everything built from a recipe's model sections."""

    teacher: Teacher
    student: Student
    fake_score: FakeScore | None
    conditioner: Any = None
    mixture: Any = None  # the analytic mixture, for gmm teachers
    sample_shape: tuple = ()
    pipeline: Any = None  # loaded diffusers components (vae, tokenizers, ...), for diffusers teachers
    extras: dict = field(default_factory=dict)


def _lora_spec(cfg: LoraConfig | None) -> LoraSpec | None:
    return None if cfg is None else LoraSpec(rank=cfg.rank, alpha=cfg.alpha, target_modules=cfg.target_modules)


def _toy_denoiser(net: NetConfig, mixture, schedule) -> Denoiser:
    from distill.models.toy import ToyMLP, ToyUNet

    # the net's timestep is schedule.model_timestep(t): VP timesteps and flow's t * 1000 span 0..1000 (scale
    # 1000), EDM passes sigma itself (scale 1)
    time_scale = float(getattr(schedule, "num_train_timesteps", 1.0))
    if net.kind == "mlp":
        backbone = ToyMLP(mixture.dim, net.hidden, net.depth, mixture.num_classes, time_scale=time_scale)
    elif net.kind == "unet2d":
        if len(mixture.sample_shape) != 3:
            raise ToolkitError(f"net kind unet2d needs image-shaped samples (C, H, W); the teacher's samples have "
                               f"shape {mixture.sample_shape} (set teacher.sample_shape or use net kind mlp)")
        try:
            backbone = ToyUNet(mixture.sample_shape, net.channels, mixture.num_classes, time_scale=time_scale)
        except ValueError as err:
            raise ToolkitError(f"unet2d toy net: {err}") from None
    else:
        raise ToolkitError(f"unknown net kind {net.kind!r}; expected mlp or unet2d")
    return Denoiser(backbone, schedule, net.prediction_type)


def _toy_student_denoiser(config: Config, teacher: Teacher, mixture, schedule) -> Denoiser:
    """A toy student: a fresh net, or (``student.init: teacher``) the exact teacher plus a zero-initialised residual.

    ``teacher`` makes the student start as the teacher's one-step x0 prediction, the analogue of copying a
    pretrained UNet into the student (consistency distillation starts from the teacher's weights).
    """
    scfg = config.student
    if scfg.time_cond_proj_dim:
        raise ToolkitError("student.time_cond_proj_dim needs a diffusers UNet student; toy students take no "
                           "guidance embedding (use a fixed w: method.w_min = method.w_max)")
    denoiser = _toy_denoiser(scfg.net, mixture, schedule)
    if scfg.init == "teacher":
        from distill.models.toy import TeacherResidual

        return Denoiser(TeacherResidual(teacher.denoiser.backbone, denoiser.backbone, schedule), schedule, "sample")
    if scfg.init != "fresh":
        raise ToolkitError(f"student.init must be fresh or teacher, got {scfg.init!r}")
    return denoiser


def _diffusers_student_denoiser(base: Denoiser, config: Config) -> Denoiser:
    """A trainable fp32 copy of the teacher; with ``student.time_cond_proj_dim``, a w-conditioned UNet.

    The w-conditioned UNet is the teacher's config plus ``time_cond_proj_dim``, loaded from the teacher's
    weights with ``strict=False`` (LCM, Luo et al. 2023, Sec. 4.2; diffusers' LCM script). Only the new
    ``time_embedding.cond_proj`` is missing; it is zero-initialised (the reference leaves it random), so the
    student starts exactly as the teacher and learns how ``w`` should move it.
    """
    scfg = config.student
    dim = scfg.time_cond_proj_dim
    unet = base.backbone
    if not dim or getattr(getattr(unet, "config", None), "time_cond_proj_dim", None) == dim:
        return make_trainable(base)
    if not hasattr(unet, "config") or not hasattr(type(unet), "from_config"):
        raise ToolkitError(f"student.time_cond_proj_dim needs a diffusers UNet, got {type(unet).__name__}")
    student = type(unet).from_config(unet.config, time_cond_proj_dim=int(dim))
    # onto the teacher's device before loading: the copy then stays on the device (and a meta teacher has no
    # data to copy to the CPU)
    student.to(next(unet.parameters()).device)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("time_embedding.cond_proj")]
    if new or unexpected:
        raise ToolkitError(f"cannot load the teacher into a UNet with time_cond_proj_dim={dim}: "
                           f"missing {new[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for param in student.time_embedding.cond_proj.parameters():
            param.zero_()
    student.train().requires_grad_(True)  # fp32, as created
    return Denoiser(student, base.schedule, base.prediction_type)


def _prepare_student(config: Config, student: Student) -> None:
    """Let the method adapt the student it trains (``Method.prepare_student(student, method_config)``, optional).

    Consistency distillation puts its boundary scalings into the student's denoiser here, so a student
    rebuilt from a run folder (``distill sample`` / ``export``) is the same function that was trained.
    """
    try:
        cls = method_class(config.method["name"])
    except ToolkitError:
        return
    hook = getattr(cls, "prepare_student", None)
    if hook is not None:
        hook(student, method_config(config))


def load_teacher_parts(tcfg, device, load_text_encoders: bool, resolution: tuple[int, int] | None):
    """The teacher pipeline's parts from ``teacher.path``: a flow transformer's (SD3 / FLUX / Sana / ...) or a
    UNet pipeline's (``resolution``: SDXL's micro-conditioning size). Raises ToolkitError for missing weights."""
    from distill.models.backbones.common import load_flow_teacher
    from distill.models.loading import load_pipeline_components

    parts = load_flow_teacher(tcfg, device, load_text_encoders)  # None for UNet pipelines
    if parts is None:
        kind = "auto" if tcfg.kind == "auto" else tcfg.kind
        parts = load_pipeline_components(tcfg.path, kind=kind, device=device or "cpu", uncond=tcfg.uncond,
                                         resolution=resolution, load_text_encoders=load_text_encoders)
    return parts


def build_models(config: Config, need_fake_score: bool = True, device=None, text_encoders: bool = True,
                 load_parts: Callable = load_teacher_parts) -> Models:
    """Teacher, student and (when the method needs one) fake score, as the recipe describes them.

    Initialisation draws from the global RNG seeded with ``train.seed``, so every process of a run (and a
    run and its resumed continuation) builds the same initial networks, whatever ran before.

    ``device``: where every module, buffer and encoder of the run lives (the process's device, e.g.
    ``accelerator.device``); None keeps the CPU. Toy nets are initialised on the CPU (the same numbers on
    every device) and then moved; diffusers weights are loaded straight onto the device.

    ``load_parts(teacher_config, device, load_text_encoders, resolution)`` gives the teacher pipeline's parts
    (default :func:`load_teacher_parts`, from ``teacher.path``); ``distill plan`` passes one that builds an
    embedded architecture on meta when the weights are not on disk.
    """
    torch.manual_seed(config.train.seed)
    models = _build_models(config, need_fake_score, device, text_encoders, load_parts)
    if config.train.gradient_checkpointing:
        enable_gradient_checkpointing(models)
    if device is not None:
        if models.mixture is not None:
            # the teacher's mixture goes to the device with the teacher; ``models.mixture`` stays a host copy that
            # data and evaluation draw from with CPU generators (the same numbers on every device), then move
            models.mixture = copy.deepcopy(models.mixture)
        place_models(models, device)
    return models


def enable_gradient_checkpointing(models: Models) -> None:
    """diffusers' ``enable_gradient_checkpointing`` on every role's backbone (the teacher too: SiD/SIM
    back-propagate through it). Activations of each block are recomputed in backward instead of stored."""
    from distill.models.export import unwrap_unet

    backbones = {id(b): b for b in (unwrap_unet(r) for r in (models.teacher, models.student, models.fake_score)
                                    if r is not None)}
    usable = [b for b in backbones.values() if hasattr(b, "enable_gradient_checkpointing")]
    if not usable:
        raise ToolkitError("train.gradient_checkpointing needs a diffusers backbone (UNet); toy nets have none")
    from distill.models.roles import AdapterView, adapter_checkpoint

    shared_lora = any(isinstance(m, AdapterView) for r in (models.teacher, models.student, models.fake_score)
                      if isinstance(r, torch.nn.Module) for m in r.modules())
    # roles switch a shared LoRA base's adapters: each block is recomputed under its forward-time adapter
    func = adapter_checkpoint if shared_lora else None
    for backbone in usable:
        backbone.enable_gradient_checkpointing(gradient_checkpointing_func=func)


def place_models(models: Models, device) -> Models:
    """Move every role of ``models`` to ``device`` (text encoders and the VAE were loaded there)."""
    for module in (models.teacher, models.student, models.fake_score):
        if isinstance(module, torch.nn.Module):
            module.to(device)
    return models


def _build_models(config: Config, need_fake_score: bool, device, text_encoders: bool,
                  load_parts: Callable) -> Models:
    tcfg = config.teacher
    if tcfg.kind == "gmm":
        from distill.models.analytic import build_mixture, mixture_conditioner, mixture_denoiser

        try:
            mixture = build_mixture(tcfg.preset, tcfg.means, tcfg.std, tcfg.stds, tcfg.weights, tcfg.labels,
                                    tcfg.sample_shape)
            schedule = build_schedule(**tcfg.schedule)
        except (ValueError, TypeError) as err:
            raise ToolkitError(f"teacher: {err}") from None
        teacher = Teacher(mixture_denoiser(mixture, schedule))
        student = Student(_toy_student_denoiser(config, teacher, mixture, schedule), config.student.timesteps,
                          config.student.noise_scale)
        if config.student.lora is not None:
            add_lora(student.denoiser.backbone, _lora_spec(config.student.lora))
        _prepare_student(config, student)
        fake = None
        if need_fake_score:
            fake_denoiser = _toy_denoiser(config.fake_score.net, mixture, schedule)
            if config.fake_score.init == "teacher":
                from distill.models.toy import TeacherResidual

                fake_denoiser = Denoiser(TeacherResidual(teacher.denoiser.backbone, fake_denoiser.backbone, schedule),
                                         schedule, "sample")
            elif config.fake_score.init != "fresh":
                raise ToolkitError(f"fake_score.init must be teacher or fresh, got {config.fake_score.init!r}")
            if config.fake_score.lora is not None:
                add_lora(fake_denoiser.backbone, _lora_spec(config.fake_score.lora))
            fake = FakeScore(fake_denoiser)
        return Models(teacher, student, fake, mixture_conditioner(mixture), mixture, mixture.sample_shape)
    from distill.models.backbones.common import flow_kinds

    if tcfg.kind in ("sdxl", "sd15", "unet2d", "auto", *flow_kinds()):
        return _build_diffusers_models(config, need_fake_score, device, text_encoders, load_parts)
    raise ToolkitError(f"unknown teacher kind {tcfg.kind!r}; expected gmm, sdxl, sd15, unet2d, auto or one of "
                       f"{', '.join(flow_kinds())}")


def image_size(resolution) -> tuple[int, int] | None:
    """``data.resolution`` (an int or ``[height, width]``, pixels) as ``(height, width)``; None stays None."""
    if resolution is None:
        return None
    values = [resolution] * 2 if isinstance(resolution, (int, float)) else list(resolution)
    if len(values) != 2 or any(int(v) != v or v <= 0 for v in values):
        raise ToolkitError(f"data.resolution must be a positive integer or [height, width], got {resolution!r}")
    return int(values[0]), int(values[1])


def _build_diffusers_models(config: Config, need_fake_score: bool, device, load_text_encoders: bool,
                            load_parts: Callable) -> Models:
    tcfg = config.teacher
    if not tcfg.path:
        raise ToolkitError("teacher.path is required for diffusers teachers (a repo id or a pipeline folder)")
    size = image_size(config.data.resolution)
    micro = tuple(tcfg.resolution) if tcfg.resolution else size  # SDXL add_time_ids: teacher.resolution overrides
    parts = load_parts(tcfg, device, load_text_encoders, micro)
    base = parts.denoiser
    # LoRA roles are adapters on the teacher's one frozen base (roles.share_lora_base); full roles are fp32 copies
    lora = {"default": _lora_spec(config.student.lora)}
    if need_fake_score:
        lora["fake_score"] = _lora_spec(config.fake_score.lora)
    lora = {name: spec for name, spec in lora.items() if spec is not None}
    if "default" in lora and config.student.time_cond_proj_dim:
        raise ToolkitError("student.time_cond_proj_dim adds a new layer that a LoRA student cannot train; use one "
                           "or the other (LCM-LoRA students have no guidance embedding)")
    student_den = _diffusers_student_denoiser(base, config) if "default" not in lora else None
    fake_den = make_trainable(base) if need_fake_score and "fake_score" not in lora else None
    teacher = Teacher(base, dtype=_DTYPES[tcfg.dtype])  # cast after the fp32 copies were made
    if lora:
        views = share_lora_base(teacher, lora)  # adapters in the order student, fake score (as before)
        student_den = views.get("default", student_den)
        fake_den = views.get("fake_score", fake_den)
    student = Student(student_den, config.student.timesteps, config.student.noise_scale)
    _prepare_student(config, student)
    fake = FakeScore(fake_den) if need_fake_score else None
    latent_shape = tuple(parts.latent_shape(1)[1:])
    if size is not None:
        factor = parts.vae_scale_factor
        if size[0] % factor or size[1] % factor:
            raise ToolkitError(f"data.resolution {list(size)} must divide by the VAE's scale factor {factor}")
        latent_shape = (latent_shape[0], size[0] // factor, size[1] // factor)
    return Models(teacher, student, fake, parts.conditioner, None, latent_shape, pipeline=parts)


def build_method(config: Config, models: Models, example_batch):
    cls = method_class(config.method["name"])
    return cls.from_models(models, method_config(config), example_batch)


def build_data(config: Config, models: Models, with_real: bool = False):
    from distill.data import PromptSource, ToySource

    dcfg = config.data
    if dcfg.kind == "toy":
        if models.mixture is None:
            raise ToolkitError("data.kind toy needs a gmm teacher; use data.kind prompts for text-to-image")
        return ToySource(models.mixture, models.conditioner, dcfg.batch_size, config.train.seed, dcfg.class_labels,
                         with_real=with_real)
    if dcfg.kind == "labels":  # class-conditional diffusers teacher (UNet2DModel pipeline)
        from distill.data import LabelSource, load_labelled_images

        if models.conditioner is None or not hasattr(models.conditioner, "num_classes"):
            raise ToolkitError("data.kind labels needs a class-conditional teacher (a UNet2DModel with class labels)")
        real = load_labelled_images(dcfg.real) if dcfg.real and with_real else None
        if with_real and real is None:
            raise ToolkitError("this method needs real data: set data.real (digits, or a .safetensors with images "
                               "and labels)")
        return LabelSource(models.conditioner, dcfg.batch_size, models.sample_shape, config.train.seed, real,
                           dcfg.class_labels)
    if dcfg.kind == "prompts":
        from distill.datasets import prompt_set, real_set

        if not dcfg.prompts:
            raise ToolkitError("data.prompts must name a prompt file (.txt, .jsonl, .csv, .parquet) or a folder "
                               "written by `distill encode-prompts`")
        kind = getattr(models.pipeline, "kind", None)
        prompts = prompt_set(dcfg.prompts, models.conditioner, dcfg.caption_column, kind)
        real = None
        if dcfg.real:
            pipeline = models.pipeline
            size = tuple(s * pipeline.vae_scale_factor for s in models.sample_shape[-2:]) if pipeline else None
            real = real_set(dcfg.real, models.conditioner, prompts, getattr(pipeline, "vae", None), size)
            shape = tuple(real.get([0])[0].shape[1:])
            if shape != tuple(models.sample_shape):
                raise ToolkitError(f"data.real latents have shape {list(shape)}, the student makes "
                                   f"{list(models.sample_shape)} (encode the images at data.resolution)")
        return PromptSource(prompts, models.conditioner, dcfg.batch_size, models.sample_shape, config.train.seed,
                            real)
    raise ToolkitError(f"unknown data.kind {dcfg.kind!r}; expected toy, labels or prompts")


def needs_text_encoders(config: Config) -> bool:
    """False when every caption the run sees has cached embeddings (``encode-prompts`` / ``encode-latents``)."""
    from distill.shards import MANIFEST, is_sharded_set

    dcfg = config.data
    if dcfg.kind != "prompts" or not is_sharded_set(dcfg.prompts):
        return True
    if not dcfg.real:
        return False
    if not is_sharded_set(dcfg.real):
        return True
    import json

    return "prompt_embeds" not in json.loads((Path(dcfg.real) / MANIFEST).read_text()).get("fields", {})


def example_batch(data, device=None):
    """A small batch for sizing heads (the GAN discriminator)."""
    return data(0, slice(0, min(2, data.global_batch_size)), device)


def build_run(config: Config, device=None, warm_start: bool = True, progress: bool = False, run_dir=None):
    """(models, method, data) for training. ``warm_start=False`` skips the regression warm start (resuming).

    ``device``: the process's device; models, the warm start and the GAN head's sizing batch all use it.
    ``run_dir``: the warm start saves its progress there and resumes from it (distill/warm_start.py).
    """
    device = torch.device(device) if device is not None else None
    cls = method_class(config.method["name"])
    mcfg = method_config(config)
    models = build_models(config, need_fake_score=getattr(cls, "needs_fake_score", True), device=device,
                          text_encoders=needs_text_encoders(config))
    needs_real = getattr(mcfg, "gan_discriminator_weight", 0) > 0 or getattr(mcfg, "data_source", None) == "real"
    data = build_data(config, models, with_real=needs_real)
    if warm_start and config.student.warm_start.steps > 0:
        from distill.warm_start import regression_warm_start

        regression_warm_start(models.student, models.teacher, data, config.student.warm_start, device, progress,
                              run_dir=run_dir, train=config.train,
                              mixed_precision=str(config.train.mixed_precision))
    method = cls.from_models(models, mcfg, example_batch(data, device))
    return models, method, data
