"""The one model contract: ``Denoiser.forward(x_t, t, cond) -> x0``.

A :class:`Denoiser` pairs a backbone (a diffusers ``UNet2DConditionModel`` / ``UNet2DModel``, a toy
net, or an analytic mixture) with its :class:`~models.schedules.Schedule` and prediction type and
returns an x0 prediction, whatever the backbone predicts (eps, v, x0, flow). ``t`` is the schedule's
own time as a tensor of shape [B]. Classifier-free guidance (Ho & Salimans 2022, Eq. 6) runs as one
batched forward of ``[uncond; cond]``; in x0 space it equals guidance in eps space, because the
conversion between them is affine with the same coefficients for both branches.

Backbones are called as ``backbone(x_t, timestep, **cond.kwargs)``, diffusers' UNet signature; the
output may be a tensor, a tuple or an object with ``.sample``.
"""
from __future__ import annotations

import torch
from torch import nn

from distill.models.conditioning import NO_COND, Cond
from distill.models.schedules import Schedule, canonical_prediction_type


def backbone_output(out) -> torch.Tensor:
    """The tensor inside a backbone's return value (diffusers returns ``UNet2DConditionOutput``)."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    return out[0]


def _as_batch_times(t, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(t, device=device)
    return t.expand(batch) if t.ndim == 0 else t


class Denoiser(nn.Module):
    """Backbone + schedule + prediction type, predicting x0.

    Args:
        backbone: callable ``(x, timestep, **kwargs)``; an ``nn.Module`` to be trainable.
        schedule: the noise schedule the backbone was trained with.
        prediction_type: ``epsilon`` / ``v_prediction`` / ``sample`` / ``flow`` (``eps``, ``v``, ``x0`` accepted).
    """

    def __init__(self, backbone: nn.Module, schedule: Schedule, prediction_type: str = "epsilon"):
        super().__init__()
        self.backbone = backbone
        self.schedule = schedule
        self.prediction_type = canonical_prediction_type(prediction_type)

    @property
    def dtype(self) -> torch.dtype:
        if hasattr(self.backbone, "compute_dtype"):  # a view of a shared base (roles.AdapterView)
            return self.backbone.compute_dtype
        param = next(iter(self.backbone.parameters()), None) if isinstance(self.backbone, nn.Module) else None
        return param.dtype if param is not None else torch.float32

    def raw(self, x_t: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """The backbone's own output (eps / v / x0 / flow) in the backbone's dtype."""
        dtype = self.dtype
        kwargs = Cond(kwargs).to(dtype=dtype).kwargs if dtype != torch.float32 else kwargs
        # analytic backbones take the schedule's own time; networks take the backbone's timestep convention
        timestep = t if getattr(self.backbone, "takes_schedule_time", False) else self.schedule.model_timestep(t)
        out = self.backbone(x_t.to(dtype), timestep, **kwargs)
        return backbone_output(out)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        """x0 prediction for the conditional branch, in the dtype of ``x_t``."""
        t = _as_batch_times(t, x_t.shape[0], x_t.device)
        kwargs = (cond or NO_COND).kwargs
        out = self.raw(x_t, t, kwargs).to(x_t.dtype)
        return self.schedule.to_x0(out, x_t, t, self.prediction_type)

    def guided(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None, scale: float) -> torch.Tensor:
        """Classifier-free guided x0: ``x0_u + scale (x0_c - x0_u)``, one forward of ``[uncond; cond]``.

        ``scale = 1`` (or no unconditional branch) is the plain conditional prediction.
        """
        if cond is None or cond.uncond is None or scale == 1.0:
            return self(x_t, t, cond)
        t = _as_batch_times(t, x_t.shape[0], x_t.device)
        x2, t2 = torch.cat([x_t, x_t]), torch.cat([t, t])
        out = self.raw(x2, t2, cond.cfg_batch()).to(x_t.dtype)
        x0_u, x0_c = self.schedule.to_x0(out, x2, t2, self.prediction_type).chunk(2)
        return x0_u + scale * (x0_c - x0_u)
