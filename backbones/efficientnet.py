"""EfficientNet-B0 and B3 (Tan & Le, 2019) with a face-embedding head.

Owns the compound-scaled MBConv network and its embedding head. Does not own ImageNet weights
or torchvision's key layout (not needed by any report here).

Architecture: B0's stage table (expansion, kernel, stride, output channels, repeats)
``(1,3,1,16,1) (6,3,2,24,2) (6,5,2,40,2) (6,3,2,80,3) (6,5,1,112,3) (6,5,2,192,4) (6,3,1,320,1)``
between a 3x3/2 stem of 32 channels and a 1x1 head conv of 1280 channels. B3 multiplies
channels by 1.2 (rounded to multiples of 8, never losing more than 10%) and repeats by 1.4
(rounded up). Each MBConv: 1x1 expansion (if the ratio is not 1) -> depthwise kxk(stride) ->
squeeze-and-excitation (reduce to a quarter of the block's *input* channels, SiLU, sigmoid gate)
-> 1x1 linear projection, with BN after every conv, SiLU (swish) activations, a residual when
stride is 1 and channels are kept, and optional stochastic depth on that residual branch.

Embedding head: global average pool -> dropout -> FC(head channels -> D) -> BatchNorm1d, in fp32.

Parameter counts at D=512 (computed by ``python launch/model_info.py``, pinned in the tests):
efficientnet_b0 4,664,444 and efficientnet_b3 11,484,200. The CASIA report counts about 11.5M
for B3 with its embedding head, which agrees: the B3 trunk alone is 10,696,232 (torchvision's
12,233,232 minus its 1536 x 1000 classifier) and the 1536 -> 512 layer adds 786,944, plus
1,024 for the BatchNorm1d. The input can be any size (the pool is adaptive); at 112x112 the
last feature map is 4x4.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from backbones import register
from backbones.common import (
    autocast_off,
    check_checkpointing,
    init_conv_weights,
    make_divisible,
    run_stage,
    upcast,
)

# (expansion ratio, kernel, stride, output channels, repeats) for B0.
_B0_STAGES = (
    (1, 3, 1, 16, 1),
    (6, 3, 2, 24, 2),
    (6, 5, 2, 40, 2),
    (6, 3, 2, 80, 3),
    (6, 5, 1, 112, 3),
    (6, 5, 2, 192, 4),
    (6, 3, 1, 320, 1),
)
_BN_EPS = 1e-3  # TensorFlow's EfficientNet value, which pretrained ports keep.


def _conv_bn_act(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True
) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch, eps=_BN_EPS),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> 1x1 reduce -> SiLU -> 1x1 expand -> sigmoid gate."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, squeeze, 1)
        self.act = nn.SiLU(inplace=True)
        self.expand = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, C, H, W]`` -> same shape, each channel scaled by a gate in (0, 1)."""
        gate = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(self.act(self.reduce(gate))))


class MBConv(nn.Module):
    """Mobile inverted bottleneck with squeeze-and-excitation.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        expansion: hidden = in_ch * expansion.
        kernel: depthwise kernel size (3 or 5).
        stride: depthwise stride.
        drop_path: probability of dropping the residual branch for a whole sample in training.
    """

    def __init__(
        self, in_ch: int, out_ch: int, expansion: int, kernel: int, stride: int, drop_path: float
    ) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.expand = _conv_bn_act(in_ch, hidden, 1) if expansion != 1 else nn.Identity()
        self.depthwise = _conv_bn_act(hidden, hidden, kernel, stride, groups=hidden)
        self.se = SqueezeExcite(hidden, max(1, in_ch // 4))
        self.project = _conv_bn_act(hidden, out_ch, 1, act=False)
        self.use_residual = stride == 1 and in_ch == out_ch
        self.drop_path = drop_path

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, out_ch, H/stride, W/stride]``."""
        out = self.project(self.se(self.depthwise(self.expand(x))))
        if not self.use_residual:
            return out
        if self.training and self.drop_path > 0.0:
            # Stochastic depth: keep each sample's branch with probability 1 - p, rescaled.
            keep = 1.0 - self.drop_path
            mask = torch.empty(out.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device)
            out = out * mask.bernoulli_(keep) / keep
        return out + x


class EfficientNet(nn.Module):
    """EfficientNet trunk + embedding head: ``[B, 3, H, W]`` -> ``[B, D]`` float32.

    Args:
        width_mult: channel multiplier (B0 1.0, B3 1.2).
        depth_mult: repeat multiplier (B0 1.0, B3 1.4).
        embedding_size: D.
        dropout: dropout probability before the embedding layer.
        drop_path_rate: stochastic-depth probability of the last block (linearly ramped from 0);
            0 by default, as face-recognition training usually runs without it.
        checkpointing: "none", "stage" or "block".
    """

    def __init__(
        self,
        width_mult: float,
        depth_mult: float,
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        checkpointing: str = "none",
    ) -> None:
        super().__init__()
        self.checkpointing = check_checkpointing(checkpointing)
        stem_ch = make_divisible(32 * width_mult)
        self.stem = _conv_bn_act(3, stem_ch, 3, stride=2)
        repeats = [math.ceil(r * depth_mult) for *_, r in _B0_STAGES]
        total = sum(repeats)
        in_ch, index = stem_ch, 0
        stages = []
        for (expansion, kernel, stride, channels, _), n in zip(_B0_STAGES, repeats):
            out_ch = make_divisible(channels * width_mult)
            blocks = []
            for j in range(n):
                rate = drop_path_rate * index / total
                blocks.append(
                    MBConv(in_ch, out_ch, expansion, kernel, stride if j == 0 else 1, rate)
                )
                in_ch, index = out_ch, index + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.ModuleList(stages)
        head_ch = make_divisible(1280 * width_mult)
        self.head = _conv_bn_act(in_ch, head_ch, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(head_ch, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        init_conv_weights(self)

    def stages(self) -> list[nn.Module]:
        """``[stem, 7 MBConv stages ..., head conv]``."""
        return [self.stem, *self.blocks, self.head]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised float -> ``[B, D]`` float32 (not L2-normalised)."""
        x = run_stage(self.stem, x, self.checkpointing, atomic=True)
        for stage in self.blocks:
            x = run_stage(stage, x, self.checkpointing)
        x = run_stage(self.head, x, self.checkpointing, atomic=True)
        x = self.dropout(torch.flatten(self.pool(x), 1))
        with autocast_off(x.device.type):
            return self.features(self.fc(upcast(x)))


def _variant(name: str, width: float, depth: float, doc: str):
    """Registers ``name``: an :class:`EfficientNet` scaled by ``width`` and ``depth``."""

    @register(name)
    def build(
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
        checkpointing: str = "none",
    ) -> EfficientNet:
        return EfficientNet(
            width,
            depth,
            embedding_size=embedding_size,
            dropout=dropout,
            drop_path_rate=drop_path_rate,
            checkpointing=checkpointing,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return build


efficientnet_b0 = _variant(
    "efficientnet_b0", 1.0, 1.0, "EfficientNet-B0 (width 1.0, depth 1.0) with an embedding head."
)
efficientnet_b3 = _variant(
    "efficientnet_b3",
    1.2,
    1.4,
    "EfficientNet-B3 (width 1.2, depth 1.4) with an embedding head; about 11.5M params.",
)
