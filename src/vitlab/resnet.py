"""The hybrid ViT's stem: BiT's ResNetV2 (Kolesnikov et al., 2020) as google-research/
vision_transformer's `models_resnet.py` has it, with weight-standardised convolutions, GroupNorm and
TensorFlow's 'SAME' padding; timm's hybrids standardise the weights slightly otherwise (`norm`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pad_same(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding: output side ceil(side / stride), the odd pixel padded after."""
    pads = []
    for side in (x.shape[-1], x.shape[-2]):
        total = max((-(-side // stride) - 1) * stride + kernel - side, 0)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads, value=value)


class StdConv2d(nn.Conv2d):
    """BiT's weight-standardised convolution, per output channel: (w - mean) / (std + 1e-5) in the
    official code (`norm="flax"`), (w - mean) / sqrt(var + 1e-8) in timm's hybrids
    (`norm="timm"`)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        norm: str = "flax",
    ):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding=0, bias=False)
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if self.norm == "timm":  # timm's own computation, for its rounding too
            w = F.batch_norm(
                w.reshape(1, w.shape[0], -1), None, None, training=True, momentum=0.0, eps=1e-8
            ).reshape_as(w)
        else:
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            std = w.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
            w = (w - mean) / (std + 1e-5)
        x = pad_same(x, self.kernel_size[0], self.stride[0])
        return F.conv2d(x, w, None, self.stride)


def _group_norm(channels: int, norm: str) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-5 if norm == "timm" else 1e-6)


class ResidualUnit(nn.Module):
    """Bottleneck unit of BiT's ResNetV2 as the ViT hybrid uses it (post-activation, GroupNorm)."""

    def __init__(self, in_channels: int, features: int, stride: int, norm: str = "flax"):
        super().__init__()
        out_channels = features * 4
        self.needs_projection = in_channels != out_channels or stride != 1
        if self.needs_projection:
            self.conv_proj = StdConv2d(in_channels, out_channels, 1, stride, norm)
            self.gn_proj = _group_norm(out_channels, norm)
        self.conv1 = StdConv2d(in_channels, features, 1, norm=norm)
        self.gn1 = _group_norm(features, norm)
        self.conv2 = StdConv2d(features, features, 3, stride, norm)
        self.gn2 = _group_norm(features, norm)
        self.conv3 = StdConv2d(features, out_channels, 1, norm=norm)
        self.gn3 = _group_norm(out_channels, norm)
        nn.init.zeros_(self.gn3.weight)  # each unit starts as the identity, as in the official init

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.gn_proj(self.conv_proj(x)) if self.needs_projection else x
        y = F.relu(self.gn1(self.conv1(x)))
        y = F.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return F.relu(residual + y)


class ResNetStem(nn.Module):
    """Root (7x7 conv stride 2, GroupNorm, ReLU, 3x3 max-pool stride 2) and the ResNet stages."""

    def __init__(self, layers: tuple[int, ...], width_factor: int, norm: str = "flax"):
        super().__init__()
        width = 64 * width_factor
        self.conv_root = StdConv2d(3, width, 7, 2, norm)
        self.gn_root = _group_norm(width, norm)
        stages, in_channels = [], width
        for i, units in enumerate(layers):
            features = width * 2**i
            stage = nn.Sequential(
                *(
                    ResidualUnit(
                        in_channels if u == 0 else features * 4,
                        features,
                        2 if (u == 0 and i > 0) else 1,
                        norm,
                    )
                    for u in range(units)
                )
            )
            stages.append(stage)
            in_channels = features * 4
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.gn_root(self.conv_root(x)))
        # 'SAME': padding never wins the max
        x = F.max_pool2d(pad_same(x, 3, 2, value=float("-inf")), 3, 2)
        return self.stages(x)
