"""The one place that turns a :class:`~distill.config.Config` into models, a method and data.

Order matters for large teachers: trainable copies (student, fake score) are made from the fp32
weights before the teacher is cast to bf16, so the student does not start from rounded weights.
When the teacher is an analytic mixture, the student and fake score are small toy nets; the fake score
can be fitted to the teacher first (``fake_score.pretrain_steps``), the analogue of "start from the
teacher's weights".
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from distill.config import Config, LoraConfig, NetConfig, from_dict
from distill.models.denoiser import Denoiser
from distill.models.errors import ToolkitError
from distill.models.roles import FakeScore, LoraSpec, Student, Teacher, add_lora, make_trainable
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

    time_scale = getattr(schedule, "num_train_timesteps", 1000) if schedule.discrete else 1.0
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
        return make_trainable(base, _lora_spec(scfg.lora))
    if scfg.lora is not None:
        raise ToolkitError("student.time_cond_proj_dim adds a new layer that a LoRA student cannot train; use one "
                           "or the other (LCM-LoRA students have no guidance embedding)")
    if not hasattr(unet, "config") or not hasattr(type(unet), "from_config"):
        raise ToolkitError(f"student.time_cond_proj_dim needs a diffusers UNet, got {type(unet).__name__}")
    student = type(unet).from_config(unet.config, time_cond_proj_dim=int(dim))
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    new = [k for k in missing if not k.startswith("time_embedding.cond_proj")]
    if new or unexpected:
        raise ToolkitError(f"cannot load the teacher into a UNet with time_cond_proj_dim={dim}: "
                           f"missing {new[:3]}, unexpected {unexpected[:3]}")
    with torch.no_grad():
        for param in student.time_embedding.cond_proj.parameters():
            param.zero_()
    student.to(next(unet.parameters()).device).train().requires_grad_(True)  # fp32, as created
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


def build_models(config: Config, need_fake_score: bool = True, device=None) -> Models:
    """Teacher, student and (when the method needs one) fake score, as the recipe describes them.

    Initialisation draws from the global RNG seeded with ``train.seed``, so every process of a run (and a
    run and its resumed continuation) builds the same initial networks, whatever ran before.
    """
    torch.manual_seed(config.train.seed)
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
    if tcfg.kind in ("sdxl", "sd15", "unet2d", "auto"):
        return _build_diffusers_models(config, need_fake_score, device)
    raise ToolkitError(f"unknown teacher kind {tcfg.kind!r}; expected gmm, sdxl, sd15 or auto")


def _build_diffusers_models(config: Config, need_fake_score: bool, device=None) -> Models:
    from distill.models.loading import load_pipeline_components

    tcfg = config.teacher
    if not tcfg.path:
        raise ToolkitError("teacher.path is required for diffusers teachers (a repo id or a pipeline folder)")
    kind = "auto" if tcfg.kind == "auto" else tcfg.kind
    parts = load_pipeline_components(tcfg.path, kind=kind, device=device or "cpu", uncond=tcfg.uncond,
                                     resolution=tuple(tcfg.resolution) if tcfg.resolution else None)
    base = parts.denoiser
    student = Student(_diffusers_student_denoiser(base, config), config.student.timesteps, config.student.noise_scale)
    _prepare_student(config, student)
    fake = FakeScore(make_trainable(base, _lora_spec(config.fake_score.lora))) if need_fake_score else None
    teacher = Teacher(base, dtype=_DTYPES[tcfg.dtype])  # cast after the fp32 copies were made
    latent_shape = tuple(parts.latent_shape(1)[1:])
    return Models(teacher, student, fake, parts.conditioner, None, latent_shape, pipeline=parts)


def build_method(config: Config, models: Models, example_batch):
    cls = method_class(config.method["name"])
    return cls.from_models(models, method_config(config), example_batch)


def build_data(config: Config, models: Models, with_real: bool = False):
    from distill.data import PromptSource, ToySource, read_prompts

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
        if not dcfg.prompts:
            raise ToolkitError("data.prompts must name a prompt file (one prompt per line)")
        real = real_prompts = None
        if dcfg.real:
            real, real_prompts = load_real_latents(dcfg.real)
        return PromptSource(read_prompts(dcfg.prompts), models.conditioner, dcfg.batch_size, models.sample_shape,
                            config.train.seed, real, real_prompts)
    raise ToolkitError(f"unknown data.kind {dcfg.kind!r}; expected toy, labels or prompts")


def load_real_latents(path: str):
    """``.safetensors`` with a ``latents`` tensor; captions in a sibling ``.txt`` (one per latent), optional."""
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise ToolkitError(f"real latents not found: {p} (a .safetensors file with a 'latents' tensor)")
    tensors = load_file(str(p))
    if "latents" not in tensors:
        raise ToolkitError(f"{p} has no 'latents' tensor (found: {', '.join(tensors)})")
    captions = p.with_suffix(".txt")
    prompts = [l.strip() for l in captions.read_text().splitlines()] if captions.is_file() else None
    return tensors["latents"].float(), prompts


def example_batch(data, device=None):
    """A small batch for sizing heads (the GAN discriminator)."""
    return data(0, slice(0, min(2, data.global_batch_size)), device)


def build_run(config: Config, device=None, warm_start: bool = True, progress: bool = False):
    """(models, method, data) for training. ``warm_start=False`` skips the regression warm start (resuming)."""
    cls = method_class(config.method["name"])
    mcfg = method_config(config)
    models = build_models(config, need_fake_score=getattr(cls, "needs_fake_score", True), device=device)
    needs_real = getattr(mcfg, "gan_discriminator_weight", 0) > 0 or getattr(mcfg, "data_source", None) == "real"
    data = build_data(config, models, with_real=needs_real)
    if warm_start and config.student.warm_start.steps > 0:
        from distill.warm_start import regression_warm_start

        regression_warm_start(models.student, models.teacher, data, config.student.warm_start, device, progress)
    method = cls.from_models(models, mcfg, example_batch(data, device))
    return models, method, data
