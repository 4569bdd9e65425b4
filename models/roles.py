"""The three roles of distillation: a frozen Teacher, a trainable Student (the generator) and a FakeScore.

All three wrap a :class:`~models.denoiser.Denoiser`, so each method is written once for every backbone
(DESIGN.md, "Contracts").

* :class:`Teacher` -- frozen (no parameter gradients, eval mode), optionally in bf16; gradients still
  flow through its *inputs*, which SiD/SIM need. Guidance is applied here.
* :class:`Student` -- the one-step (``G(z, c) = x0(x_{t*} = z, t*, c)``) or few-step generator. Starts as a
  copy of the teacher's backbone (or a fresh toy net when the teacher is analytic); optional LoRA.
* :class:`FakeScore` -- a trainable denoiser of the student's distribution (DMD's mu_fake, SiD's f_psi),
  a copy of the teacher; optional LoRA (VSD style).
"""
from __future__ import annotations

import copy
import logging
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from distill.models.conditioning import Cond
from distill.models.denoiser import Denoiser

#: LoRA targets for diffusers UNets: attention, transformer projections, resnet convolutions (as DMD2 and
#: the diffusers LCM-LoRA script adapt them).
UNET_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                     "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj"]


@dataclass
class LoraSpec:
    """peft LoRA settings (Hu et al. 2021). ``target_modules`` None: UNet targets, or every Linear of a toy net."""

    rank: int = 64
    alpha: float | None = None  # defaults to rank (scale 1)
    target_modules: list[str] | str | None = None
    init: str | bool = "gaussian"  # peft's init_lora_weights; B = 0 either way, so the adapter starts as identity
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)


def _default_targets(module: nn.Module) -> list[str] | str:
    names = {name.split(".")[-1] for name, _ in module.named_modules()}
    if "to_q" in names:
        present = {n for n, _ in module.named_modules()}
        return [t for t in UNET_LORA_TARGETS if any(n.endswith(t) for n in present)]
    return [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]


def add_lora(module: nn.Module, spec: LoraSpec, adapter_name: str = "default") -> nn.Module:
    """Insert a peft LoRA adapter into ``module`` in place; only adapter weights stay trainable.

    diffusers models use their own ``add_adapter`` (so ``save_lora_weights`` understands them); any other
    ``nn.Module`` goes through ``peft.inject_adapter_in_model``.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha or spec.rank, lora_dropout=spec.dropout,
                        target_modules=spec.target_modules or _default_targets(module),
                        init_lora_weights=spec.init, **spec.extra)
    module.requires_grad_(False)
    with warnings.catch_warnings():
        # a second adapter on the one shared base (LoRA student and LoRA fake score) is the design, not a slip
        warnings.filterwarnings("ignore", message="Already found a `?peft_config`? attribute")
        if hasattr(module, "add_adapter") and hasattr(module, "set_adapters"):
            module.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, module, adapter_name=adapter_name)
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def has_lora(module: nn.Module) -> bool:
    return any("lora_" in name for name, _ in module.named_parameters())


class _EmptyFp32ListFilter(logging.Filter):
    """Drops diffusers' "should be kept in float32: []" (0.42 warns on every dtype cast, even with none listed)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def cast_floating(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``module``'s floating parameters and buffers to ``dtype`` in place (a no-op when they already are).

    Through the module's own ``to`` (diffusers' checks, such as its refusal to cast a quantised model, still
    apply); only diffusers 0.42's spurious warning for an empty ``_keep_in_fp32_modules`` list is dropped.
    """
    if not any(t.is_floating_point() and t.dtype != dtype for t in module.state_dict().values()):
        return module
    logger, spurious = logging.getLogger("diffusers.models.modeling_utils"), _EmptyFp32ListFilter()
    logger.addFilter(spurious)
    try:
        return module.to(dtype)
    finally:
        logger.removeFilter(spurious)


def trainable_copy(denoiser: Denoiser, dtype: torch.dtype = torch.float32) -> Denoiser:
    """A trainable copy of a denoiser (the teacher's weights) in ``dtype`` (fp32 for optimisation)."""
    backbone = cast_floating(copy.deepcopy(denoiser.backbone), dtype)
    backbone.requires_grad_(True)
    backbone.train()
    return Denoiser(backbone, denoiser.schedule, denoiser.prediction_type)


class Teacher(nn.Module):
    """Frozen teacher with classifier-free guidance.

    Args:
        denoiser: the pretrained model.
        guidance_scale: CFG weight ``w`` used by default (DMD2: SDXL 8, SD1.5 1.75).
        dtype: cast the backbone (bf16 halves memory; DMD2 keeps the teacher in bf16, fp16 diverges).
    """

    def __init__(self, denoiser: Denoiser, guidance_scale: float = 1.0, dtype: torch.dtype | None = None):
        super().__init__()
        if dtype is not None and isinstance(denoiser.backbone, nn.Module):
            cast_floating(denoiser.backbone, dtype)
        denoiser.requires_grad_(False)
        denoiser.eval()
        self.denoiser, self.guidance_scale = denoiser, guidance_scale

    @property
    def schedule(self):
        return self.denoiser.schedule

    def train(self, mode: bool = True) -> "Teacher":  # a teacher never leaves eval mode
        return super().train(False)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None,
                guidance_scale: float | None = None) -> torch.Tensor:
        scale = self.guidance_scale if guidance_scale is None else guidance_scale
        return self.denoiser.guided(x_t, t, cond, scale)

    def guided(self, x_t, t, cond, scale):  # sampler interface
        return self.denoiser.guided(x_t, t, cond, scale)


class Student(nn.Module):
    """The generator ``G``: one step from ``t*`` (``timesteps=[t*]``) or a few steps over ``timesteps``.

    Args:
        denoiser: the student network (a trainable copy of the teacher, or a toy net).
        timesteps: the fixed generation times, descending (DMD2 4-step SDXL: [999, 749, 499, 249]).
        noise_scale: input at the first step is ``noise_scale * z``: ``"unit"`` (DMD2 feeds pure noise z) or
            ``"sigma"`` (``sigma(t*) z``, SiD's ``x = D(sigma_init z)`` in VP units).
    """

    def __init__(self, denoiser: Denoiser, timesteps: Sequence[float] = (999,), noise_scale: str = "unit"):
        super().__init__()
        if noise_scale not in ("unit", "sigma"):
            raise ValueError(f"noise_scale must be 'unit' or 'sigma', got {noise_scale!r}")
        self.denoiser = denoiser
        # a buffer, so it follows the student to its device (a CPU copy in device maths fails on CUDA); the
        # python values serve host-side control flow without reading the device
        self.register_buffer("timesteps", torch.as_tensor(list(timesteps)), persistent=False)
        self.timestep_values = tuple(float(t) for t in timesteps)
        self.noise_scale = noise_scale

    @property
    def schedule(self):
        return self.denoiser.schedule

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def input_from_noise(self, z: torch.Tensor) -> torch.Tensor:
        if self.noise_scale == "unit":
            return z
        _, sigma = self.schedule.alpha_sigma(self.timesteps[:1])
        return z * sigma.to(z.dtype)

    def times(self, step: int, batch: int, device) -> torch.Tensor:
        return self.timesteps[step].to(device).expand(batch)

    def forward(self, z: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """One generator step from noise: ``x0(noise_scale z, t_0, c)`` (with gradient)."""
        return self.denoiser(self.input_from_noise(z), self.times(0, z.shape[0], z.device), cond)

    def guided(self, x_t, t, cond, scale):  # sampler interface: a student is never guided
        return self.denoiser(x_t, t, cond)


class FakeScore(nn.Module):
    """Trainable denoiser of the generator's distribution (DMD's fake score, SiD's f_psi). Never guided."""

    def __init__(self, denoiser: Denoiser):
        super().__init__()
        self.denoiser = denoiser

    @property
    def schedule(self):
        return self.denoiser.schedule

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        return self.denoiser(x_t, t, cond)


def make_trainable(denoiser: Denoiser, lora: LoraSpec | None = None) -> Denoiser:
    """A trainable copy of ``denoiser`` in fp32, full or with a LoRA adapter."""
    copy_ = trainable_copy(denoiser)
    if lora is not None:
        add_lora(copy_.backbone, lora)
    return copy_


# ---------------------------------------------------------------------- one frozen base for LoRA roles
def _lora_layers(module: nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def adapter_checkpoint(module: nn.Module, *args):
    """Gradient checkpointing for a block of a LoRA base shared by several roles (diffusers'
    ``enable_gradient_checkpointing(gradient_checkpointing_func=...)``).

    Checkpointing recomputes the block's forward during backward, when another role's view may have switched
    the shared layers to its adapter (or off, for the teacher): recomputed with the wrong adapter, the block
    saves other tensors than its forward did and autograd raises (or, worse, would differentiate another
    role's function). So the adapter state of the block's LoRA layers at forward time is recorded and put back
    for the recomputation, then restored.
    """
    import torch.utils.checkpoint

    layers = _lora_layers(module)
    at_forward = [(layer._disable_adapters, layer._active_adapter) for layer in layers]

    def run(*inputs):
        now = [(layer._disable_adapters, layer._active_adapter) for layer in layers]
        for layer, (disabled, active) in zip(layers, at_forward):
            layer._disable_adapters, layer._active_adapter = disabled, active
        try:
            return module(*inputs)
        finally:
            for layer, (disabled, active) in zip(layers, now):
                layer._disable_adapters, layer._active_adapter = disabled, active

    return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)


class AdapterView(nn.Module):
    """One role's view of a backbone shared by several roles: the frozen base plus (at most) one LoRA adapter.

    LoRA DMD2 / ESD / LCM would otherwise hold three copies of the base UNet (a bf16 teacher and two fp32
    copies under the student's and the fake score's adapters). Here the teacher's single base carries the
    student's and the fake score's adapters (peft multi-adapter), and each role calls it through a view that
    activates its own adapter for the call: ``adapter=None`` is the teacher (adapters off). With gradient
    checkpointing, :func:`adapter_checkpoint` puts a block's forward-time adapter back for its recomputation.

    Parameters: the teacher's view registers the base (so ``teacher.to(device)`` moves it); an adapter's view
    registers only its adapter's weights (``named_parameters`` holds no base weight and no other adapter), so
    optimisers, checkpoints, EMA and :class:`~distill.methods.base.frozen` see exactly the role's weights.
    Switching sets peft's layer state directly: peft's ``set_adapter`` / ``enable_adapters`` would also flip
    ``requires_grad`` of the other adapters (which the trainer controls). The switch lasts one forward call;
    autograd has recorded which adapter was used, so backward needs no switching (except for checkpointed
    recomputation, above).

    The base stays in its own dtype (bf16 teacher), the adapters in fp32 (peft computes the LoRA branch in
    the adapter's dtype and casts back); :attr:`compute_dtype` tells :class:`~models.denoiser.Denoiser` the
    dtype the base expects.
    """

    def __init__(self, base: nn.Module, adapter: str | None):
        super().__init__()
        self.adapter = adapter
        if adapter is None:
            self.shared = base  # registered: the teacher owns the base
            self.adapter_params = nn.ParameterDict()
        else:
            self._base = [base]  # a list: not a submodule of this view
            self.rebind()

    def rebind(self) -> None:
        """Register the adapter's current parameter objects of the base (again).

        Call it after anything replaces the base's parameters: FSDP2's ``fully_shard`` swaps every parameter for
        a DTensor holding this process's shard, and a view still holding the old objects would hand the
        optimiser and the checkpoint tensors the forward no longer uses. Raises ValueError when the base has no
        adapter of this view's name.
        """
        if self.adapter is None:
            return
        self.adapter_params = nn.ParameterDict({
            name.replace(".", "__"): p for name, p in self._base[0].named_parameters()
            if f".{self.adapter}." in f".{name}." and "lora_" in name})
        if not len(self.adapter_params):
            raise ValueError(f"the shared backbone has no LoRA adapter {self.adapter!r}")

    @property
    def backbone(self) -> nn.Module:
        """The shared module (what export and GAN taps look into)."""
        return self.shared if self.adapter is None else self._base[0]

    @property
    def compute_dtype(self) -> torch.dtype:
        return next(p for n, p in self.backbone.named_parameters() if "lora_" not in n).dtype

    @property
    def config(self):  # diffusers' model config, for code that inspects the backbone
        return getattr(self.backbone, "config", None)

    def activate(self) -> None:
        for layer in _lora_layers(self.backbone):
            if self.adapter is None:
                layer._disable_adapters = True
            else:
                layer._disable_adapters = False
                layer._active_adapter = [self.adapter]

    def forward(self, *args, **kwargs):
        self.activate()
        return self.backbone(*args, **kwargs)


def share_lora_base(teacher: "Teacher", specs: dict[str, LoraSpec]) -> dict[str, Denoiser]:
    """Put one LoRA adapter per role (``{"default": student_spec, "fake_score": spec}``) on the teacher's base.

    The teacher's backbone becomes an :class:`AdapterView` with adapters off; returns a denoiser per adapter
    name whose backbone is that adapter's view. Adapters are added in the order given (their initial weights
    draw from the global RNG in that order) and made trainable; adapters of a bf16 base are kept in fp32.
    """
    den = teacher.denoiser
    base = den.backbone
    for name, spec in specs.items():
        add_lora(base, spec, adapter_name=name)
    for name, p in base.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()  # peft may create adapters in the base's dtype: optimise them in fp32
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    den.backbone = AdapterView(base, None)
    return {name: Denoiser(AdapterView(base, name), den.schedule, den.prediction_type) for name in specs}
