"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018).

Two gates applied one after the other, each a few lines:

* :class:`ChannelAttention` — *which* channels matter: average- and max-pooled descriptors go
  through one shared MLP, are summed and squashed into a per-channel gate.
* :class:`SpatialAttention` — *where* to look: the channel-wise mean and max are stacked, a k×k
  conv (+BatchNorm, as in the official code) turns them into a per-pixel gate.

Two initialisations:

* paper (``identity_init=False``): the spatial gate's BatchNorm weight starts at 0, as in the official
  code, so the spatial gate is exactly ``sigmoid(0) = 0.5`` everywhere — inserting the module into a
  pretrained network scales its features down at the start.
* identity (``identity_init=True``): each gate is ``2·sigmoid(z)`` and the layer producing ``z``
  starts at zero, so both gates are exactly 1 and the module returns its input unchanged; gradients
  still reach its parameters, so it learns from the first step.
"""

from __future__ import annotations

import torch
from torch import nn


class ChannelAttention(nn.Module):
    """Per-channel gate from avg- and max-pooled descriptors through one shared MLP."""

    def __init__(self, channels: int, reduction: int = 16, identity_init: bool = False):
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False),
        )
        self.gain = 2.0 if identity_init else 1.0
        if identity_init:
            nn.init.zeros_(self.mlp[2].weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg = self.mlp(x.mean(dim=(2, 3), keepdim=True))
        peak = self.mlp(x.amax(dim=(2, 3), keepdim=True))
        return self.gain * torch.sigmoid(avg + peak)  # (N, C, 1, 1)


class SpatialAttention(nn.Module):
    """Per-pixel gate from the channel-wise mean and max through a k×k conv."""

    def __init__(self, kernel_size: int = 7, identity_init: bool = False):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd so the map keeps its size, got {kernel_size}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)
        nn.init.zeros_(self.bn.weight)  # official init: the gate starts at exactly 0.5 (or 1 with gain 2)
        self.gain = 2.0 if identity_init else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return self.gain * torch.sigmoid(self.bn(self.conv(pooled)))  # (N, 1, H, W)


class CBAM(nn.Module):
    """Channel attention, then spatial attention; the output has the input's shape.

    In eval mode the last spatial map is kept in ``last_attention`` (N, 1, H, W) for plotting.
    """

    def __init__(self, channels: int, reduction: int = 16, kernel_size: int = 7, identity_init: bool = False):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction, identity_init)
        self.spatial = SpatialAttention(kernel_size, identity_init)
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * self.channel(x)
        spatial_gate = self.spatial(x)
        if not self.training:
            self.last_attention = spatial_gate.detach()
        return x * spatial_gate

    def extra_repr(self) -> str:
        return "identity_init=True" if self.channel.gain == 2.0 else ""
