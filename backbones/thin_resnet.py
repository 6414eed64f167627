"""Thin ResNets of the EE488 course report: thin_resnet34, thin_resnet50, thin_resnet50_v2.

Owns these three architectures as the report's table specifies them (not as its text counts
them, see below). Does not own the classic torchvision ResNets (``backbones/resnet.py``).

Architecture (from the report's table):
  * stem: 7x7 conv, 64 channels, stride 2 -> BN -> ReLU -> 3x3 max pool, stride 2;
  * four stages of bottleneck blocks (1x1 reduce -> 3x3 (carrying the stride) -> 1x1 expand
    to 4x the stage width, each followed by BN, ReLU after the first two and after the
    residual sum; a 1x1 conv + BN shortcut where the shape changes), strides 1/2/2/2;
  * stage widths 48/96/128/256 with 2-3-3-3 blocks (thin_resnet34) or 3-4-6-3 blocks
    (thin_resnet50); widths 48/96/192/384 with 3-4-6-3 blocks (thin_resnet50_v2);
  * global average pool -> dropout -> fully connected to D (512 in the report).

Parameter counts at D=512, built as above and counted by the tests: 5,918,144 (thin_resnet34),
6,955,904 (thin_resnet50) and 14,028,160 (thin_resnet50_v2). The report's text says about 4.9M,
6M and 12.4M, which its own table does not give; this module follows the table. The counts do
not depend on the input size (global pooling), so any input size divisible by 32 gives an
exact 1/32 spatial reduction; others work too (the pooling is adaptive).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from backbones import register
from backbones.common import (
    autocast_off,
    check_checkpointing,
    init_conv_weights,
    run_stages,
    upcast,
)
from backbones.resnet import Bottleneck, add_stages


class ThinResNet(nn.Module):
    """Thin bottleneck ResNet: image ``[B, 3, H, W]`` -> embedding ``[B, D]`` float32.

    Args:
        layers: blocks per stage (four integers).
        widths: bottleneck width per stage (outputs are 4x these).
        embedding_size: D.
        dropout: dropout probability before the embedding layer.
        checkpointing: "none", "stage" or "block".
    """

    def __init__(
        self,
        layers: list[int],
        widths: list[int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        checkpointing: str = "none",
    ) -> None:
        super().__init__()
        if len(layers) != 4 or len(widths) != 4:
            raise ValueError(f"need 4 stage depths and widths, got {layers} and {widths}")
        self.checkpointing = check_checkpointing(checkpointing)
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        in_ch = add_stages(self, Bottleneck, layers, widths)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch, embedding_size)
        init_conv_weights(self, nonlinearity="relu")

    def stages(self) -> list[nn.Module]:
        """``[stem, layer1, layer2, layer3, layer4]``."""
        return [self.stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised float -> ``[B, D]`` float32 (not L2-normalised)."""
        x = run_stages(self.stages(), x, self.checkpointing)
        x = self.dropout(torch.flatten(self.pool(x), 1))
        with autocast_off(x.device.type):
            return self.fc(upcast(x))


def _variant(name: str, blocks: list[int], widths: list[int], doc: str):
    """Registers ``name``: a :class:`ThinResNet` with ``blocks`` bottlenecks per stage."""

    @register(name)
    def build(
        *, embedding_size: int = 512, dropout: float = 0.0, checkpointing: str = "none"
    ) -> ThinResNet:
        return ThinResNet(
            blocks,
            widths,
            embedding_size=embedding_size,
            dropout=dropout,
            checkpointing=checkpointing,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return build


thin_resnet34 = _variant(
    "thin_resnet34",
    [2, 3, 3, 3],
    [48, 96, 128, 256],
    "ThinResNet34: widths 48/96/128/256, 2-3-3-3 bottlenecks; 5,918,144 params at D=512.",
)
thin_resnet50 = _variant(
    "thin_resnet50",
    [3, 4, 6, 3],
    [48, 96, 128, 256],
    "ThinResNet50: widths 48/96/128/256, 3-4-6-3 bottlenecks; 6,955,904 params at D=512.",
)
thin_resnet50_v2 = _variant(
    "thin_resnet50_v2",
    [3, 4, 6, 3],
    [48, 96, 192, 384],
    "ThinResNet50_V2: widths 48/96/192/384, 3-4-6-3 bottlenecks; 14,028,160 params at D=512.",
)
