"""Small time-conditioned networks for toy problems (2-D mixtures, tiny images).

:class:`ToyMLP` for vectors, :class:`ToyUNet` (a tiny diffusers ``UNet2DModel``) for images. These play
the student and the fake score when the teacher is an analytic mixture. They follow the diffusers
backbone signature ``net(x, timestep, class_labels=None)`` so the same
:class:`~models.denoiser.Denoiser` wraps them.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Transformer-style sinusoidal features of a scalar time (Vaswani et al. 2017; DDPM's time embedding)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ToyMLP(nn.Module):
    """MLP denoiser backbone for vectors (or any shape, flattened).

    Args:
        dim: number of values in one sample.
        hidden, depth: width and number of hidden layers.
        num_classes: > 0 adds a class embedding with an extra null class (label -1 or ``num_classes``).
        time_scale: the backbone's timestep is divided by this before embedding (1000 for VP timesteps),
            then multiplied by 1000 inside the embedding so that all schedules see the same frequencies.
    """

    def __init__(self, dim: int, hidden: int = 256, depth: int = 3, num_classes: int = 0,
                 time_scale: float = 1000.0, emb_dim: int = 64):
        super().__init__()
        self.dim, self.num_classes, self.time_scale, self.emb_dim = dim, num_classes, time_scale, emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden)) for _ in range(depth))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        shape = x.shape
        t = torch.as_tensor(timestep, device=x.device).expand(shape[0])
        emb = self.time_mlp(sinusoidal_embedding(t / self.time_scale * 1000.0, self.emb_dim))
        if self.class_emb is not None:
            labels = torch.full((shape[0],), -1, device=x.device, dtype=torch.long) if class_labels is None \
                else class_labels.to(x.device).long()
            emb = emb + self.class_emb(torch.where(labels < 0, self.num_classes, labels))
        h = self.inp(x.reshape(shape[0], -1)) + emb
        for block in self.blocks:
            h = h + block(h)
        return self.out(h).reshape(shape)

    @property
    def output_layer(self) -> nn.Module:
        return self.out[-1]


class ToyUNet(nn.Module):
    """A tiny diffusers ``UNet2DModel`` for image-space toys (e.g. the ``image4`` mixture of 1x8x8 images).

    A real encoder / mid-block / decoder UNet, so image-space tests exercise what SD-class backbones have:
    DMD2's GAN head taps ``unet.mid_block``. Same signature and time convention as :class:`ToyMLP`.

    Args:
        sample_shape: ``(channels, height, width)`` of one sample; height and width must be divisible by
            ``2 ** (len(channels) - 1)``.
        channels: block widths (one down/up block each); ``norm_groups`` must divide every width.
        num_classes: > 0 adds a class embedding with an extra null class (label -1 or ``num_classes``).
        attention: use attention in the lowest-resolution blocks (off by default: a toy does not need it).
    """

    def __init__(self, sample_shape, channels=(16, 32), num_classes: int = 0, time_scale: float = 1000.0,
                 layers_per_block: int = 1, norm_groups: int = 8, attention: bool = False):
        super().__init__()
        from diffusers import UNet2DModel

        c, h, w = (int(v) for v in sample_shape)
        if h % 2 ** (len(channels) - 1) or w % 2 ** (len(channels) - 1):
            raise ValueError(f"sample size {h}x{w} must divide by 2^{len(channels) - 1} for {len(channels)} blocks")
        down = ["DownBlock2D"] * len(channels)
        up = ["UpBlock2D"] * len(channels)
        if attention:
            down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
        self.num_classes, self.time_scale = num_classes, time_scale
        self.unet = UNet2DModel(sample_size=(h, w), in_channels=c, out_channels=c, block_out_channels=tuple(channels),
                                layers_per_block=layers_per_block, down_block_types=tuple(down),
                                up_block_types=tuple(up), norm_num_groups=norm_groups, add_attention=attention,
                                attention_head_dim=8, num_class_embeds=num_classes + 1 if num_classes else None)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        t = torch.as_tensor(timestep, device=x.device).expand(x.shape[0]).float() / self.time_scale * 1000.0
        labels = None
        if self.num_classes:
            labels = torch.full((x.shape[0],), -1, device=x.device, dtype=torch.long) if class_labels is None \
                else class_labels.to(x.device).long()
            labels = torch.where(labels < 0, self.num_classes, labels)
        return self.unet(x, t, class_labels=labels).sample

    @property
    def output_layer(self) -> nn.Module:
        return self.unet.conv_out


class TeacherResidual(nn.Module):
    """``x0 = teacher_x0(x_t, t) + net(x_t, t)`` with the net's last layer zero-initialised.

    The toy analogue of "initialise the fake score from the teacher's weights" (DMD2, SiD): at step 0 the
    fake score *is* the teacher, and training only has to learn how the generator's distribution differs
    from the teacher's. Used when the teacher is analytic and cannot be copied into a network.
    """

    takes_schedule_time = True  # the exact teacher needs the schedule's time; the net gets its own timestep

    def __init__(self, teacher_backbone: nn.Module, net: nn.Module, schedule):
        super().__init__()
        self.teacher_backbone, self.net, self.schedule = teacher_backbone, net, schedule
        self.teacher_backbone.requires_grad_(False)
        last = net.output_layer  # ToyMLP or ToyUNet
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor | None = None):
        # no torch.no_grad here: SiD and SIM differentiate the fake score with respect to its input x, and that
        # gradient must include the teacher part (its parameters are frozen above, so nothing else flows)
        base = self.teacher_backbone(x, timestep, class_labels)
        return base + self.net(x, self.schedule.model_timestep(timestep), class_labels)
