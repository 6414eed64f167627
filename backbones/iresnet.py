"""InsightFace's improved ResNet (iResNet) for 112x112 faces: iresnet18/34/50/100/200.

Owns the architecture of arcface_torch's ``backbones/iresnet.py``, re-implemented here with the
same layers, order and state-dict key names (``conv1``, ``bn1``, ``prelu``, ``layer1..4.N.{bn1,
conv1,bn2,prelu,conv2,bn3,downsample.0,downsample.1}``, ``bn2``, ``fc``, ``features``), so weights
released for arcface_torch load with ``load_state_dict``. Does not own training tricks (the
trainer decides precision; this module only keeps the embedding layer in fp32).

Architecture facts (Deng et al., ArcFace; Duta et al., iResNet):
  * stem: 3x3 conv (64, stride 1) -> BN -> PReLU, so 112x112 stays 112x112;
  * four stages of ``IBasicBlock`` (BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv(stride) -> BN,
    plus the identity or a 1x1 conv(stride) + BN shortcut), widths 64/128/256/512, each stage
    starting with stride 2, so 112 -> 7;
  * head ("E" output layer): BN2d -> flatten -> dropout -> FC(512*7*7 -> D) -> BN1d whose scale is
    fixed at 1 (``features.weight`` does not train, as in arcface_torch).
Blocks per stage: 18: 2-2-2-2, 34: 3-4-6-3, 50: 3-4-14-3, 100: 3-13-30-3, 200: 6-26-60-6.
Parameters at D=512, 112x112 (counted by the tests): 24,025,600 / 34,139,328 / 43,590,848 /
65,156,160 / 118,833,920.

Extensions that leave the defaults identical to the reference: ``input_size`` (the FC input is
512*(H/16)*(W/16)) and ``width_mult`` (scales the 64/128/256/512 widths, for fast CPU runs).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backbones import register
from backbones.common import (
    autocast_off,
    check_checkpointing,
    pair,
    run_stage,
    unregistered_view,
    upcast,
)

_BN_EPS = 1e-5


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation style residual block of iResNet.

    Args:
        in_ch: input channels.
        out_ch: output channels.
        stride: stride of the second 3x3 convolution (and of the shortcut).
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.conv1 = _conv3x3(in_ch, out_ch)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = _conv3x3(out_ch, out_ch, stride)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=_BN_EPS)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_ch, eps=_BN_EPS),
            )

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, out_ch, H/stride, W/stride]``."""
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


class IResNet(nn.Module):
    """iResNet: image ``[B, 3, H, W]`` float -> embedding ``[B, D]`` float32.

    Args:
        layers: blocks per stage, four integers.
        embedding_size: D.
        dropout: dropout probability before the FC layer.
        input_size: H, W of the input (the FC layer depends on it); both divisible by 16.
        width_mult: scales the stage widths 64/128/256/512 (1.0 = reference).
        checkpointing: "none", "stage" or "block" gradient checkpointing.
    """

    _stem: nn.Sequential  # the stem modules as one unit, see common.unregistered_view

    def __init__(
        self,
        layers: list[int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int | tuple[int, int] = 112,
        width_mult: float = 1.0,
        checkpointing: str = "none",
    ) -> None:
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"iresnet needs 4 stage depths, got {layers}")
        height, width = pair(input_size)
        if height % 16 or width % 16:
            raise ValueError(f"iresnet input_size must be divisible by 16, got {(height, width)}")
        self.checkpointing = check_checkpointing(checkpointing)
        self.input_size = (height, width)
        widths = [max(8, int(round(c * width_mult))) for c in (64, 128, 256, 512)]

        self.conv1 = _conv3x3(3, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0], eps=_BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        unregistered_view(self, "_stem", self.conv1, self.bn1, self.prelu)
        in_ch = widths[0]
        for i, (depth, out_ch) in enumerate(zip(layers, widths), start=1):
            blocks = [IBasicBlock(in_ch, out_ch, stride=2)]
            blocks += [IBasicBlock(out_ch, out_ch) for _ in range(depth - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            in_ch = out_ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch * (height // 16) * (width // 16), embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=_BN_EPS)
        self._init_weights()

    def _init_weights(self) -> None:
        # arcface_torch's initialisation: N(0, 0.1) convolutions, unit BatchNorms, and the final
        # BatchNorm1d scale fixed at 1 (it is excluded from training).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)

    def stages(self) -> list[nn.Module]:
        """``[stem, layer1, layer2, layer3, layer4]`` for freezing leading stages."""
        return [self._stem, *self._layers()]

    def _layers(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised float -> ``[B, D]`` float32 (not L2-normalised)."""
        if tuple(x.shape[-2:]) != self.input_size:
            raise ValueError(
                f"iresnet was built for input {self.input_size}, got {tuple(x.shape[-2:])}; "
                "pass input_size=(H, W) to the builder"
            )
        x = run_stage(self._stem, x, self.checkpointing, atomic=True)
        for layer in self._layers():
            x = run_stage(layer, x, self.checkpointing)
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        with autocast_off(x.device.type):
            return self.features(self.fc(upcast(x)))


def _variant(name: str, layers: list[int], params: int):
    """Registers ``name``: an :class:`IResNet` with ``layers`` blocks per stage."""

    @register(name)
    def build(
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        checkpointing: str = "none",
        input_size: int | tuple[int, int] = 112,
        width_mult: float = 1.0,
    ) -> IResNet:
        return IResNet(
            layers,
            embedding_size=embedding_size,
            dropout=dropout,
            checkpointing=checkpointing,
            input_size=input_size,
            width_mult=width_mult,
        )

    blocks = "-".join(map(str, layers))
    build.__name__ = build.__qualname__ = name
    build.__doc__ = (
        f"iResNet-{name[len('iresnet') :]} ({blocks} blocks); {params:,} parameters at D=512, "
        "112x112."
    )
    return build


iresnet18 = _variant("iresnet18", [2, 2, 2, 2], 24_025_600)
iresnet34 = _variant("iresnet34", [3, 4, 6, 3], 34_139_328)
iresnet50 = _variant("iresnet50", [3, 4, 14, 3], 43_590_848)
iresnet100 = _variant("iresnet100", [3, 13, 30, 3], 65_156_160)
iresnet200 = _variant("iresnet200", [6, 26, 60, 6], 118_833_920)
