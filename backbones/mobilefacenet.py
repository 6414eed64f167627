"""MobileFaceNet (Chen et al., 2018): a sub-1M-parameter face network that is fast on CPU.

Owns the paper's architecture (its Table 1) with two cheap extensions: ``width_mult`` scales
every channel count (multiples of 8) and ``input_size`` sizes the global depthwise
convolution. Does not own InsightFace's later "mbf" variant (different widths and depths).

Layers at 112x112 (t = expansion, c = channels, n = repeats, s = stride of the first):
  conv3x3/2 64 -> depthwise conv3x3 64 -> bottleneck(t2, c64, n5, s2) -> bottleneck(t4, c128,
  n1, s2) -> bottleneck(t2, c128, n6, s1) -> bottleneck(t4, c128, n1, s2) -> bottleneck(t2,
  c128, n2, s1) -> conv1x1 512 -> linear GDConv 7x7 (depthwise, no padding) -> linear conv1x1 D.
Every conv is followed by BatchNorm; PReLU is the non-linearity, except after the GDConv, the
bottleneck projections and the final layer, which stay linear. Bottlenecks are MobileNetV2's
(1x1 expand, 3x3 depthwise, 1x1 project, residual when the shape is kept).
At D=128, 112x112 this gives 1,003,136 parameters (convolutions 976,000, BatchNorm 19,584,
PReLU 7,552; the paper reports 0.99M without saying what it counts, and conv + BatchNorm is
995,584) and 220,965,376 conv MACs (the paper: 221M), counted by ``backbones.info``. The
default embedding here is the project's 512; ``embedding_size=128`` gives the paper's network.
Speed note: depthwise convolutions are memory-bound on CPU, so in eager PyTorch this network
is only about 3x faster than iresnet18 there despite 12x fewer MACs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backbones import register
from backbones.common import (
    autocast_off,
    check_checkpointing,
    init_conv_weights,
    make_divisible,
    pair,
    run_stage,
    upcast,
)

# (expansion t, channels c, repeats n, stride s) of the paper's Table 1.
_BOTTLENECKS = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))


def _conv_bn(
    in_ch: int,
    out_ch: int,
    kernel: int | tuple[int, int],
    stride: int = 1,
    groups: int = 1,
    prelu: bool = True,
    padding: int | None = None,
) -> nn.Sequential:
    if padding is None:
        padding = (kernel - 1) // 2 if isinstance(kernel, int) else 0
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if prelu:
        layers.append(nn.PReLU(out_ch))
    return nn.Sequential(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual with PReLU: 1x1 expand -> 3x3 depthwise -> 1x1 linear."""

    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.expand = _conv_bn(in_ch, hidden, 1)
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_ch, 1, prelu=False)
        self.use_residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, out_ch, H/stride, W/stride]``."""
        out = self.project(self.depthwise(self.expand(x)))
        return out + x if self.use_residual else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet: ``[B, 3, H, W]`` -> ``[B, D]`` float32.

    Args:
        embedding_size: D (the paper uses 128).
        width_mult: scales every channel count (1.0 = paper).
        input_size: H, W, both divisible by 16 (the GDConv kernel is H/16 x W/16).
        dropout: dropout probability before the final linear layer.
        checkpointing: "none", "stage" or "block".
    """

    def __init__(
        self,
        *,
        embedding_size: int = 512,
        width_mult: float = 1.0,
        input_size: int | tuple[int, int] = 112,
        dropout: float = 0.0,
        checkpointing: str = "none",
    ) -> None:
        super().__init__()
        height, width = pair(input_size)
        if height % 16 or width % 16:
            raise ValueError(
                f"mobilefacenet input_size must be divisible by 16, got {(height, width)}"
            )
        self.checkpointing = check_checkpointing(checkpointing)
        self.input_size = (height, width)
        c64 = make_divisible(64 * width_mult)
        self.stem = nn.Sequential(_conv_bn(3, c64, 3, stride=2), _conv_bn(c64, c64, 3, groups=c64))
        in_ch = c64
        stages = []
        for expansion, channels, repeats, stride in _BOTTLENECKS:
            out_ch = make_divisible(channels * width_mult)
            blocks = []
            for j in range(repeats):
                blocks.append(Bottleneck(in_ch, out_ch, expansion, stride if j == 0 else 1))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        c512 = make_divisible(512 * width_mult)
        self.conv_expand = _conv_bn(in_ch, c512, 1)
        # Global depthwise conv: a learned per-channel spatial weighting instead of average
        # pooling (the paper's point: face corners and centre matter differently).
        self.gdc = _conv_bn(c512, c512, (height // 16, width // 16), groups=c512, prelu=False)
        self.dropout = nn.Dropout(p=dropout)
        self.linear = nn.Conv2d(c512, embedding_size, 1, bias=False)
        self.features = nn.BatchNorm1d(embedding_size)
        init_conv_weights(self)

    def stages(self) -> list[nn.Module]:
        """``[stem, 5 bottleneck stages ..., conv_expand + gdc]``."""
        return [self.stem, *self.blocks, nn.Sequential(self.conv_expand, self.gdc)]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised float -> ``[B, D]`` float32 (not L2-normalised)."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"mobilefacenet was built for input {self.input_size}, got "
                f"{tuple(x.shape[-2:])}; pass input_size=(H, W) to the builder"
            )
        for stage in self.stages():
            x = run_stage(stage, x, self.checkpointing)
        x = self.dropout(x)
        with autocast_off(x.device.type):
            return self.features(torch.flatten(self.linear(upcast(x)), 1))


@register("mobilefacenet")
def mobilefacenet(
    *,
    embedding_size: int = 512,
    dropout: float = 0.0,
    checkpointing: str = "none",
    input_size: int | tuple[int, int] = 112,
    width_mult: float = 1.0,
) -> MobileFaceNet:
    """MobileFaceNet; ``embedding_size=128`` is the paper's 0.99M-parameter network."""
    return MobileFaceNet(
        embedding_size=embedding_size,
        width_mult=width_mult,
        input_size=input_size,
        dropout=dropout,
        checkpointing=checkpointing,
    )
