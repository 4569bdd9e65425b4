"""Processes, devices and how modules are wrapped for N processes.

The run's device must be known *before* anything is built: with N processes on one node every rank
builds its own copies of the teacher, the student, the fake score and the text encoders, and builds
them directly on its own GPU (``LOCAL_RANK``), never on GPU 0 and never on the CPU first.
:func:`make_accelerator` creates the ``accelerate.Accelerator`` (which initialises the process group and
picks ``cuda:LOCAL_RANK``) from the recipe's ``train`` section, and refuses settings the engine cannot
honour, in one line, before any slow work.

Why not accelerate's own FSDP/DeepSpeed plugins: the Trainer never calls ``accelerator.prepare`` (the fake
score is trainable in the critic step and frozen in the generator step; see ``distill/engine.py``), so
an accelerate config that asks for FSDP or DeepSpeed would be silently ignored. It is refused instead.
"""
from __future__ import annotations

import os

import torch

from distill.models.errors import ToolkitError

#: mixed-precision settings the engine honours. fp16 needs a loss scaler, which the engine does not have
#: (and DMD2 reports that fp16 diverges for SDXL): refused rather than silently unscaled.
MIXED_PRECISION = ("no", "bf16")


def check_mixed_precision(mode: str) -> str:
    """``mode`` if the engine honours it; ToolkitError otherwise (``fp16``: no loss scaler)."""
    if mode is False or mode is None:  # YAML reads an unquoted ``no`` as false
        mode = "no"
    mode = {"bfloat16": "bf16", "none": "no", "fp32": "no", "float32": "no"}.get(str(mode), str(mode))
    if mode in ("fp16", "float16"):
        raise ToolkitError("train.mixed_precision fp16 is not supported (no loss scaler; fp16 diverges for "
                           "DMD2-class losses): use bf16 or no")
    if mode not in MIXED_PRECISION:
        raise ToolkitError(f"train.mixed_precision must be one of {', '.join(MIXED_PRECISION)}, got {mode!r}")
    return mode


def _refuse_unhonoured_accelerate_plugins() -> None:
    """An accelerate config asking for FSDP / DeepSpeed / Megatron would be silently ignored: refuse it."""
    env = os.environ
    asked = [name for name, flag in (("FSDP", "ACCELERATE_USE_FSDP"), ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"),
                                     ("Megatron-LM", "ACCELERATE_USE_MEGATRON_LM"))
             if env.get(flag, "false").lower() in ("1", "true", "yes")]
    if asked:
        raise ToolkitError(f"the accelerate config asks for {asked[0]}, which distill does not take from accelerate; "
                           f"remove it from the accelerate config (distill shards with train.parallel=fsdp)")


def make_accelerator(train_config):
    """The run's ``Accelerator``: processes, this process's device and mixed precision.

    Call it before building models, and build on ``accelerator.device``. Raises ToolkitError for
    ``mixed_precision: fp16`` or an accelerate FSDP/DeepSpeed config (nothing would honour them).
    """
    from accelerate import Accelerator

    from accelerate.state import AcceleratorState

    mode = check_mixed_precision(getattr(train_config, "mixed_precision", "no"))
    train_config.mixed_precision = mode  # canonical, for everything that reads it later
    _refuse_unhonoured_accelerate_plugins()
    # accelerate keeps one global state per process and refuses a second run (a notebook, a test) with another
    # precision; the process group (PartialState) is kept, only the precision settings are renewed
    AcceleratorState._reset_state()
    return Accelerator(mixed_precision=mode, cpu=not torch.cuda.is_available())


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given; else this process's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU.

    For commands that run in one process (``distill sample`` / ``export``) and for library callers that did
    not create an Accelerator.
    """
    if device is not None:
        try:
            return torch.device(device)
        except (RuntimeError, TypeError) as err:
            raise ToolkitError(f"invalid device {device!r}: {err}") from None
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def adamw8bit_class():
    """bitsandbytes' ``AdamW8bit`` (Dettmers et al. 2022, 8-bit optimiser states), or a ToolkitError."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ToolkitError("generator_optim/critic_optim kind adamw8bit needs bitsandbytes (pip install "
                           "bitsandbytes) and a CUDA device; or use kind: adamw") from None
    return bnb.optim.AdamW8bit


OPTIMIZERS = ("adamw", "adamw8bit")
PARALLEL = ("none", "ddp", "fsdp")


def check_parallel(train_config, world_size: int) -> str:
    """``train.parallel`` if the engine can honour it with ``world_size`` processes; ToolkitError otherwise."""
    mode = getattr(train_config, "parallel", "ddp")
    if mode not in PARALLEL:
        raise ToolkitError(f"train.parallel must be one of {', '.join(PARALLEL)}, got {mode!r}")
    if mode == "none" and world_size > 1:
        raise ToolkitError(f"train.parallel none runs one process, but {world_size} were launched: use ddp or fsdp")
    return mode


def validate_run_config(config, world_size: int = 1, device_type: str = "cpu") -> None:
    """Refuse, in one line and before anything is built, settings the engine cannot honour."""
    train = config.train
    check_mixed_precision(train.mixed_precision)
    check_parallel(train, world_size)
    for section in ("generator_optim", "critic_optim"):
        kind = getattr(config, section).kind
        if kind not in OPTIMIZERS:
            raise ToolkitError(f"{section}.kind must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
        if kind == "adamw8bit":
            adamw8bit_class()
            if device_type != "cuda":
                raise ToolkitError(f"{section}.kind adamw8bit needs a CUDA device (bitsandbytes' 8-bit states)")


# ---------------------------------------------------------------------- FSDP2
def _blocks(backbone: torch.nn.Module) -> list[torch.nn.Module]:
    """The units sharded one by one (each all-gathered just before it runs): a flow adapter's transformer blocks
    (its ``blocks()``: FLUX's double- and single-stream blocks, SD3's, Sana's, Z-Image's layers), a diffusers
    UNet's down / mid / up blocks; anything else is one unit (the root)."""
    if callable(getattr(backbone, "blocks", None)):
        return list(backbone.blocks())
    units = []
    for name in ("down_blocks", "up_blocks"):
        units += list(getattr(backbone, name, None) or [])
    if getattr(backbone, "mid_block", None) is not None:
        units.append(backbone.mid_block)
    return units


def _rebind_adapter_views(method) -> None:
    """Point every LoRA role view at the sharded parameters (``fully_shard`` replaced the base's parameters)."""
    from distill.models.roles import AdapterView

    for module in vars(method).values():
        if isinstance(module, torch.nn.Module):
            for view in module.modules():
                if isinstance(view, AdapterView):
                    view.rebind()


def shard_roles(method, fsdp_config, device: torch.device) -> dict[str, torch.nn.Module]:
    """``fully_shard`` (FSDP2, Zhao et al. 2023) the method's roles over all processes, in place.

    Trainable roles (student, fake score) keep fp32 parameters and reduce gradients in fp32; the frozen
    teacher (and a consistency method's EMA target) keeps its own dtype (bf16 for large teachers) and has
    nothing to reduce. Each UNet or transformer block is its own unit, then the backbone root. LoRA roles are
    adapters on the teacher's one base (:func:`distill.models.roles.share_lora_base`): that base is sharded
    once, bf16 base weights and fp32 adapters in the same units (FSDP2 gathers each dtype as it is stored),
    and the role views are pointed at the sharded adapter parameters. A GAN head (DMD2) is sharded as its own
    unit, and its tap then runs the fake score's full forward (distill/gan.py: an early stop would skip
    FSDP2's post-forward hooks). Returns the sharded modules by role (a shared base under its first role).
    Build the optimisers and any copy of the parameters (EMA) after this: sharding replaces the parameters by
    DTensors holding this process's shard.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    from distill.models.export import unwrap_unet

    if not dist.is_initialized():  # one process (e.g. resuming a sharded run alone): a group of one
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    world = dist.get_world_size()
    mesh = init_device_mesh(device.type, (world,))
    kwargs = dict(mesh=mesh, reshard_after_forward=bool(fsdp_config.reshard_after_forward))
    if fsdp_config.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # the root units keep their (small: conv_in, embeddings, conv_out) parameters gathered from forward to backward
    # (FSDP2's default for roots): a GAN pass uses the fake score's bottleneck, not its output, so the root's
    # pre-backward hook never fires, and resharded parameters would be missing in the backward to the student
    root_kwargs = {**kwargs, "reshard_after_forward": None if kwargs["reshard_after_forward"] else False}
    sharded = {}
    for name in ("student", "fake_score", "teacher", "target"):
        role = getattr(method, name, None)
        if role is None:
            continue
        backbone = unwrap_unet(role)
        if not isinstance(backbone, torch.nn.Module) or not any(True for _ in backbone.parameters()):
            continue  # an analytic teacher has nothing to shard
        if any(backbone is done for done in sharded.values()):
            continue  # the one base of LoRA roles, already sharded under the first role that uses it
        trainable = any(p.requires_grad for p in backbone.parameters())
        mp = MixedPrecisionPolicy(reduce_dtype=torch.float32) if trainable else MixedPrecisionPolicy()
        for unit in _blocks(backbone):
            fully_shard(unit, mp_policy=mp, **kwargs)
        fully_shard(backbone, mp_policy=mp, **root_kwargs)
        sharded[name] = backbone
    discriminator = getattr(method, "discriminator", None)
    if discriminator is not None:
        discriminator.stop_early = False
        fully_shard(discriminator.head, mp_policy=MixedPrecisionPolicy(reduce_dtype=torch.float32), **root_kwargs)
        sharded["discriminator"] = discriminator.head
    _rebind_adapter_views(method)
    return sharded


def fsdp_units(modules) -> list[torch.nn.Module]:
    """Every FSDP2 unit (``fully_shard``-ed module) inside ``modules``."""
    from torch.distributed.fsdp import FSDPModule

    return [m for module in modules for m in module.modules() if isinstance(m, FSDPModule)]


def reshard(units: list[torch.nn.Module]) -> None:
    """Free the gathered parameters of every unit in ``units`` (no communication).

    Call it after each optimiser step. A unit can stay gathered after a forward without a backward (a root
    unit, which FSDP2 keeps gathered for the backward; a forward under no_grad, such as the critic step's
    student samples; or ``reshard_after_forward: false``); its next forward would reuse those weights from
    before the step, and ``named_parameters`` would show the gathered tensors instead of the shards the
    optimiser and the EMA hold.
    """
    for unit in units:
        unit.reshard()


def is_sharded(tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A full tensor laid out as ``target``: this process's shard of it when ``target`` is sharded."""
    from torch.distributed.tensor import distribute_tensor

    value = value.to(dtype=target.dtype)
    if is_sharded(target):
        return distribute_tensor(value.to(target.device_mesh.device_type), target.device_mesh, target.placements)
    return value.to(target.device)


def local_elements(params) -> int:
    """Elements this process holds of ``params`` (its shards under FSDP)."""
    return sum((p.to_local() if is_sharded(p) else p).numel() for p in params)


def load_full_optimizer_state(modules: dict[str, torch.nn.Module], optimizer, state: dict) -> None:
    """Load an optimiser state of full tensors keyed by parameter name (any world size, sharded or not)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(torch.nn.ModuleDict(modules), optimizer, state,
                             options=StateDictOptions(full_state_dict=True))
