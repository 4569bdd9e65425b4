"""Exponential moving average of a module's trainable parameters (Polyak averaging)."""
from __future__ import annotations

import contextlib

import torch
from torch import nn


class EMA:
    """Keeps ``shadow = decay * shadow + (1 - decay) * param`` for every trainable parameter of ``module``."""

    def __init__(self, module: nn.Module, decay: float):
        self.module, self.decay = module, decay
        self.names = [n for n, p in module.named_parameters() if p.requires_grad]
        params = dict(module.named_parameters())
        self.shadow = {n: params[n].detach().clone().float() for n in self.names}

    @torch.no_grad()
    def update(self) -> None:
        params = dict(self.module.named_parameters())
        for name in self.names:
            self.shadow[name].lerp_(params[name].detach().float(), 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.shadow)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            self.shadow[name].copy_(state[name])

    @torch.no_grad()
    def copy_to(self, module: nn.Module | None = None) -> None:
        params = dict((module or self.module).named_parameters())
        for name in self.names:
            params[name].copy_(self.shadow[name].to(params[name].dtype))

    @contextlib.contextmanager
    def swapped(self):
        """Temporarily put the EMA weights into the module (for sampling)."""
        params = dict(self.module.named_parameters())
        backup = {n: params[n].detach().clone() for n in self.names}
        self.copy_to()
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(backup[name])
