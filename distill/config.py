"""Recipes: YAML -> typed dataclasses, with dotted ``key=value`` overrides.

A recipe names components (teacher, student, fake score, method, data) and training settings; a new
recipe needs no new Python (torchtune-style). Unknown keys are errors that name the key and the
allowed ones, so a typo never silently falls back to a default. The resolved config is saved with
each run (``RUN/config.yaml``).
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.config_rules import alias, check_config, check_fields, coerce
from distill.models.errors import ToolkitError


@dataclass
class NetConfig:
    """A toy network (used when the teacher is analytic).

    ``kind``: ``mlp`` (``models.toy.ToyMLP``: ``hidden``, ``depth``; any sample shape) or ``unet2d``
    (``models.toy.ToyUNet``, a tiny diffusers ``UNet2DModel``: ``channels``; image-shaped samples only).
    """

    kind: str = "mlp"
    hidden: int = 256
    depth: int = 3
    channels: list = field(default_factory=lambda: [16, 32])  # unet2d block widths
    prediction_type: str = "v_prediction"  # v is well conditioned at both ends of the schedule


@dataclass
class TeacherConfig:
    """``kind``: ``gmm`` (analytic mixture: ``preset`` or explicit parameters), ``sdxl``, ``sd15``, ``unet2d``, ``auto``."""

    kind: str = "gmm"
    preset: str | None = None
    means: list | None = None
    std: float | None = None
    stds: list | None = None
    weights: list | None = None
    labels: list | None = None
    sample_shape: list | None = None
    path: str | None = None  # diffusers repo id or local pipeline folder
    dtype: str = "float32"  # bfloat16 for large teachers (DMD2 keeps the teacher in bf16)
    schedule: dict = field(default_factory=lambda: {"kind": "vp"})  # gmm only; diffusers teachers use theirs
    resolution: list | None = None  # SDXL add_time_ids (pixels)
    uncond: str = "zeros"  # SDXL unconditional branch: zeros (DMD2) or empty prompt
    # flow transformers (sd3 / flux / sana, models/backbones/): GAN-head block indices (default: the middle one),
    # FLUX.1-dev's guidance embedding (used instead of CFG; default 3.5), the T5 / Gemma prompt length
    gan_blocks: list | None = None
    guidance_embedding: float | None = None
    max_sequence_length: int | None = None


@dataclass
class LoraConfig:
    rank: int = 64
    alpha: float | None = None
    target_modules: list | None = None


@dataclass
class WarmStartConfig:
    """Regression onto the teacher's DDIM map before distillation (distill/warm_start.py)."""

    steps: int = 0  # 0: no warm start
    ode_steps: int = 50  # teacher DDIM steps for the targets
    lr: float = 1e-3
    guidance_scale: float = 1.0
    pairs: int = 0  # > 0: a fixed set of this many noise -> sample pairs, made once (DMD's regression data)
    grad_clip: float | None = None  # None: 1.0 for diffusers backbones (full UNets), off for toy nets; 0: off


@dataclass
class StudentConfig:
    timesteps: list = field(default_factory=lambda: [999])
    noise_scale: str = "unit"
    net: NetConfig = field(default_factory=NetConfig)
    lora: LoraConfig | None = None
    time_cond_proj_dim: int | None = None  # LCM guidance embedding (consistency distillation)
    warm_start: WarmStartConfig = field(default_factory=WarmStartConfig)
    # toy nets: "fresh" = a plain toy net; "teacher" = exact teacher + zero-initialised residual net (starts as
    # the teacher's one-step x0, the analogue of copying the teacher's weights; used by consistency recipes)
    init: str = "fresh"


@dataclass
class FakeScoreConfig:
    net: NetConfig = field(default_factory=NetConfig)
    lora: LoraConfig | None = None
    # toy nets: "teacher" = exact teacher + a zero-initialised residual net (the analogue of copying the
    # teacher's weights, as DMD2 and SiD initialise the fake score); "fresh" = a plain toy net
    init: str = "teacher"


@dataclass
class DataConfig:
    """``kind``: ``toy`` (noise + labels; real samples from the mixture), ``labels`` (class-conditional diffusers
    teacher; ``real``: ``digits`` or a .safetensors with images and labels) or ``prompts`` (text file)."""

    kind: str = "toy"
    batch_size: int = 256
    prompts: str | None = None
    real: str | None = None  # precomputed real latents (.safetensors with "latents" [and "prompts"]) for GANs
    # text-to-image: generated image size in pixels (an int or [height, width]); sets the latent size and SDXL's
    # add_time_ids (unless teacher.resolution overrides those). Default: the pipeline's (unet sample_size x VAE factor)
    resolution: int | list | None = None
    caption_column: str | None = None  # .jsonl / .csv / .parquet prompt files: default caption, prompt or text
    class_labels: list | None = None  # restrict toy labels; default: all classes uniformly


@dataclass
class OptimConfig:
    kind: str = "adamw"  # adamw, or adamw8bit (bitsandbytes, CUDA): 2 bytes of state per parameter instead of 8
    lr: float = 1e-4
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0  # linear warm-up over this many training ITERATIONS (DMD2's count), whatever the TTUR ratio
    grad_clip: float = 10.0


@dataclass
class FsdpConfig:
    """``train.parallel: fsdp`` settings (distill/parallel.py)."""

    reshard_after_forward: bool = True  # free gathered parameters after each forward (less memory, more traffic)
    cpu_offload: bool = False  # parameters, gradients and optimiser states of the shards live in CPU memory


@dataclass
class EvalConfig:
    """In-training evaluation (``train.eval_every`` > 0): metrics of ``n`` in-memory samples against ``ref``.

    ``ref``: reference statistics ``.npz`` (or an image folder); ``metrics``: ``fid`` and optionally ``clip``
    (any of ``distill eval``'s); ``features``: the extractor behind ``fid`` (``inception``; ``identity`` for
    toy vector data); ``prompts``: text-to-image prompts (default ``data.prompts``). The best checkpoint by
    FID (else the first ``fd_*``; lower is better) is kept in ``RUN/checkpoints/best/``. See distill/train_eval.py.
    """

    n: int = 1000
    ref: str | None = None
    metrics: list = field(default_factory=lambda: ["fid"])
    features: str = "inception"
    inception: str | None = None
    prompts: str | None = None
    batch_size: int = 64
    seed: int = 0
    clip_model: str | None = None
    clip_pretrained: str | None = None


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    grad_accum: int = 1
    mixed_precision: str = "no"  # "bf16" on GPU
    ema_decay: float | None = None
    checkpoint_every: int = 0  # 0: only at the end
    # also checkpoint when this many minutes passed since the last one (rank 0's clock); 0: off
    checkpoint_minutes: float = 10.0
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0
    sample_count: int = 1024
    max_nan_steps: int = 10
    gradient_checkpointing: bool = False  # diffusers backbones: recompute activations in backward (less memory)
    # ddp: every process holds full copies, gradients averaged (one all-reduce per optimiser step);
    # fsdp: student, fake score (+ GAN head) and teacher sharded (FSDP2); none: one process only
    parallel: str = "ddp"
    fsdp: FsdpConfig = field(default_factory=FsdpConfig)
    eval_every: int = 0  # 0: no in-training evaluation
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class Config:
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    fake_score: FakeScoreConfig = field(default_factory=FakeScoreConfig)
    method: dict = field(default_factory=lambda: {"name": "dmd2"})
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generator_optim: OptimConfig = field(default_factory=OptimConfig)
    critic_optim: OptimConfig = field(default_factory=OptimConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- parsing
def _dataclass_type(tp) -> type | None:
    """The dataclass inside ``X``, ``X | None`` or ``Optional[X]``."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from a dict, recursively; unknown keys raise ToolkitError naming them."""
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ToolkitError(f"config section {where or cls.__name__} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ToolkitError(f"unknown config key(s) {', '.join(where + k for k in unknown)}; "
                           f"allowed in {where.rstrip('.') or 'the top level'}: {', '.join(sorted(names))}")
    kwargs = {}
    for name, value in data.items():
        sub = _dataclass_type(hints[name])
        if sub is not None and (isinstance(value, dict) or value is None and type(None) not in typing.get_args(hints[name])):
            kwargs[name] = from_dict(sub, value, f"{where}{name}.")  # a section (null: its defaults)
        else:  # typed from the hint; a section given as a non-mapping is named here too
            kwargs[name] = coerce(alias(cls, name, value), hints[name], where + name)
            if sub is not None and kwargs[name] is not None:
                raise ToolkitError(f"config section {where}{name} must be a mapping, got {value!r}")
    obj = cls(**kwargs)
    check_fields(obj, where)
    return obj


def parse_value(text: str) -> Any:
    """YAML semantics for override values: ``3`` -> int, ``1e-4`` -> float, ``[1,2]`` -> list, ``null``."""
    value = yaml.safe_load(text)
    if isinstance(value, str):  # yaml reads 1e-4 as a string; accept scientific notation
        try:
            return float(value)
        except ValueError:
            return value
    return value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a nested dict (creating sections as needed)."""
    for item in overrides:
        if "=" not in item:
            raise ToolkitError(f"override {item!r} must look like key.subkey=value")
        key, text = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ToolkitError(f"override {key!r}: {part!r} is not a section")
        node[parts[-1]] = parse_value(text)
    return data


def _floats(data):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; turn such strings back into floats."""
    if isinstance(data, dict):
        return {k: _floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_floats(v) for v in data]
    if isinstance(data, str):
        try:
            return float(data) if any(c in data for c in "eE") and data[0] in "0123456789.-+" else data
        except ValueError:
            return data
    return data


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a recipe (or start from defaults with ``path=None``) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ToolkitError(f"recipe not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ToolkitError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
    data = apply_overrides(_floats(data), overrides or [])
    config = from_dict(Config, data)
    if not isinstance(config.method, dict) or "name" not in config.method:
        raise ToolkitError("the recipe's method section needs a name (dmd2, sid, sim, esd, consistency)")
    check_config(config)  # rules across fields, and the method section against its own dataclass
    return config


def save_config(config: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically (a temporary file renamed into place)."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    os.replace(tmp, path)
