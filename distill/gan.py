"""GAN head on the fake score's bottleneck features and the non-saturating losses (DMD2, Yin et al. 2024, Sec. 4.2).

The discriminator is not a separate network: it is a small head on the **fake score's** bottleneck
(mid-block) features, so the fake score's encoder and mid block are trained by the discriminator loss
too. A forward hook taps the bottleneck and stops the forward there (the decoder is not needed for a
logit), which saves roughly half of the fake score's compute for GAN passes.

Under FSDP2 the forward is not stopped (``Discriminator.stop_early = False``, set by
``distill.parallel.shard_roles``): an exception out of the bottleneck skips the sharded backbone's
post-forward hooks (its root state stays "in forward", the last all-gather buffer is not released), which is
outside FSDP2's supported use. The full forward costs the decoder's compute for GAN passes; the decoder's
output is unused, so it takes no part in the backward and the logits are the same numbers as with the early
stop (tests/test_gan.py).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distill.models.conditioning import Cond


class _StopForward(Exception):
    pass


def _tree(backbone: nn.Module) -> nn.Module:
    """The module tree to look into: a LoRA role's view of the shared base shows the base."""
    from distill.models.roles import AdapterView

    return backbone.backbone if isinstance(backbone, AdapterView) else backbone


def default_feature_module(backbone: nn.Module) -> str:
    """``mid_block`` for diffusers UNets; the middle residual block for toy MLPs.

    Wrapped backbones (a toy fake score initialised from the teacher is ``TeacherResidual.net``, a toy UNet
    holds its ``UNet2DModel`` as ``.unet``) have these under a prefix: the shallowest match is taken.
    """
    backbone = _tree(backbone)
    names = dict(backbone.named_modules())

    def find(leaf: str) -> str | None:
        found = [n for n in names if n == leaf or n.endswith("." + leaf)]
        return min(found, key=lambda n: n.count(".")) if found else None

    mid = find("mid_block")
    if mid is not None:
        return mid
    blocks = find("blocks")
    if blocks is not None:
        return f"{blocks}.{len(names[blocks]) // 2}"
    raise ValueError("cannot find a bottleneck to put the GAN head on; set gan_feature_module in the config")


class FeatureTap:
    """Runs a backbone up to ``module_name`` and returns that module's output.

    ``stop=False`` runs the whole forward and only records the output (FSDP2: see the module docstring).
    """

    def __init__(self, backbone: nn.Module, module_name: str, stop: bool = True):
        backbone = _tree(backbone)
        self.module = dict(backbone.named_modules()).get(module_name)
        if self.module is None:
            raise ValueError(f"the fake score has no submodule {module_name!r} for the GAN head")
        self.features: torch.Tensor | None = None
        self.stop = stop

    def _hook(self, module, inputs, output):
        self.features = output[0] if isinstance(output, tuple) else output
        if self.stop:
            raise _StopForward

    def __call__(self, run) -> torch.Tensor:
        handle = self.module.register_forward_hook(self._hook)
        try:
            run()
        except _StopForward:
            pass
        finally:
            handle.remove()
        if self.features is None:
            raise RuntimeError("the GAN feature module was not reached in the forward pass")
        features, self.features = self.features, None
        return features


def _groups(channels: int) -> int:
    """GroupNorm(32) as DMD2 (1280 channels: 40 per group), but never fewer than 8 channels per group.

    The last block normalises a 1x1 map: with one (or two) channels per group every value is normalised to
    0 (or +-1) and the logit no longer depends on the input, which is what narrow backbones (toy and tiny
    UNets, 32-64 mid-block channels) would get from ``GroupNorm(32)``.
    """
    return math.gcd(32, max(channels // 8, 1))


class DiscriminatorHead(nn.Module):
    """DMD2's head: [Conv4x4 s2, GroupNorm(32), SiLU] blocks down to ~4x4, then [Conv4x4 s4, GN, SiLU], Conv1x1.

    For SDXL at 1024 px (1280 ch at 32x32) that is three stride-2 blocks then the stride-4 block. Smaller
    feature maps use fewer stride-2 blocks; a final average pool makes any size give one logit. Vector
    features (toy MLPs) get an MLP head.
    """

    def __init__(self, channels: int, spatial: int | None, hidden: int | None = None):
        super().__init__()
        if spatial is None:  # vector features
            hidden = hidden or channels
            self.net = nn.Sequential(nn.Linear(channels, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                     nn.Linear(hidden, 1))
            return
        layers, size = [], spatial
        while size > 4:
            layers += [nn.Conv2d(channels, channels, 4, 2, 1), nn.GroupNorm(_groups(channels), channels), nn.SiLU()]
            size //= 2
        if size >= 4:
            layers += [nn.Conv2d(channels, channels, 4, 4, 0), nn.GroupNorm(_groups(channels), channels), nn.SiLU()]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, 1, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # a new tensor, not a view of the net's output (FSDP2 hooks a sharded head's output for its backward)
        return self.net(features).flatten(1).sum(1)


class Discriminator(nn.Module):
    """Head + tap on the fake score's backbone: ``logits(x_t, t, cond)``.

    ``stop_early``: stop the fake score's forward at the tapped module (False under FSDP2).
    """

    stop_early: bool = True

    def __init__(self, fake_denoiser, feature_module: str | None = None, example: torch.Tensor | None = None,
                 example_t: torch.Tensor | None = None, example_cond: Cond | None = None):
        super().__init__()
        self.feature_module = feature_module or default_feature_module(fake_denoiser.backbone)
        self._fake = [fake_denoiser]  # a list: do not register the fake score as a submodule of the head
        with torch.no_grad():
            feats = self.features(example, example_t, example_cond)
        spatial = feats.shape[-1] if feats.ndim == 4 else None
        self.head = DiscriminatorHead(feats.shape[1], spatial).to(feats.device)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        denoiser = self._fake[0]
        tap = FeatureTap(denoiser.backbone, self.feature_module, stop=self.stop_early)
        kwargs = (cond.kwargs if cond is not None else {})
        return tap(lambda: denoiser.raw(x_t, t, kwargs)).float()

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        return self.head(self.features(x_t, t, cond))


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss ``softplus(-D(fake))`` (Goodfellow et al. 2014, Sec. 3)."""
    return F.softplus(-fake_logits).mean()


def discriminator_gan_loss(fake_logits: torch.Tensor, real_logits: torch.Tensor) -> torch.Tensor:
    """``softplus(D(fake)) + softplus(-D(real))``."""
    return F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
