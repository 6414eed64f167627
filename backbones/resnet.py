"""Classic ResNet34/ResNet50 in torchvision's key layout, with a face-embedding head.

Owns the two networks and ``load_torchvision_state_dict``, which initialises them from an
ImageNet state dict saved by torchvision (the Asian-faces report started from ImageNet weights).
Does not import torchvision: the layout is re-implemented and checked key by key in the tests.

Layout (torchvision's ``resnet34``/``resnet50``, v1.5 with the stride on the 3x3 conv):
``conv1`` (7x7/2, 64) -> ``bn1`` -> ReLU -> 3x3/2 max pool -> ``layer1..4`` (BasicBlock 3-4-6-3
for 34, Bottleneck 3-4-6-3 for 50; keys ``conv1, bn1, conv2, bn2[, conv3, bn3],
downsample.0, downsample.1``) -> adaptive average pool (any input size, e.g. 112 or 160) ->
dropout -> ``fc`` (512 or 2048 -> D) -> ``features`` (BatchNorm1d). ``fc`` replaces ImageNet's
1000-class classifier, so it and ``features`` are the only keys not taken from ImageNet weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from backbones import register
from backbones.common import (
    autocast_off,
    check_checkpointing,
    init_conv_weights,
    run_stages,
    unregistered_view,
    upcast,
)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = _shortcut(in_ch, width, stride)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, width, H/stride, W/stride]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


class Bottleneck(nn.Module):
    """1x1 -> 3x3(stride) -> 1x1 (4x) bottleneck (ResNet-50 and deeper)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _shortcut(in_ch, width * 4, stride)

    def forward(self, x: Tensor) -> Tensor:
        """``[B, in_ch, H, W]`` -> ``[B, 4*width, H/stride, W/stride]``."""
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
    )


def add_stages(
    owner: nn.Module,
    block: type[BasicBlock] | type[Bottleneck],
    layers: list[int],
    widths: tuple[int, ...] | list[int],
    in_ch: int = 64,
) -> int:
    """Adds ``layer1 .. layerN`` (torchvision's names) to ``owner``; returns the output channels.

    Stage i has ``layers[i]`` blocks of width ``widths[i]``; every stage but the first halves
    the resolution in its first block.
    """
    for i, (depth, width) in enumerate(zip(layers, widths), start=1):
        stride = 1 if i == 1 else 2
        blocks: list[nn.Module] = [block(in_ch, width, stride)]
        in_ch = width * block.expansion
        blocks += [block(in_ch, width) for _ in range(depth - 1)]
        owner.add_module(f"layer{i}", nn.Sequential(*blocks))
    return in_ch


class ResNet(nn.Module):
    """torchvision-layout ResNet with an embedding head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: blocks per stage (four integers).
        embedding_size: D.
        dropout: dropout probability before ``fc``.
        checkpointing: "none", "stage" or "block".
    """

    _stem: nn.Sequential  # the stem modules as one unit, see common.unregistered_view

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: list[int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        checkpointing: str = "none",
    ) -> None:
        super().__init__()
        self.checkpointing = check_checkpointing(checkpointing)
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        unregistered_view(self, "_stem", self.conv1, self.bn1, self.relu, self.maxpool)
        in_ch = add_stages(self, block, layers, (64, 128, 256, 512))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_ch, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size)
        init_conv_weights(self, nonlinearity="relu")

    def stages(self) -> list[nn.Module]:
        """``[stem (conv1, bn1), layer1, layer2, layer3, layer4]``."""
        return [self._stem, self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: Tensor) -> Tensor:
        """``[B, 3, H, W]`` normalised float (any H, W >= 32) -> ``[B, D]`` float32."""
        x = run_stages(self.stages(), x, self.checkpointing)
        x = self.dropout(torch.flatten(self.avgpool(x), 1))
        with autocast_off(x.device.type):
            return self.features(self.fc(upcast(x)))


@dataclass
class LoadReport:
    """What ``load_torchvision_state_dict`` did.

    Attributes:
        loaded: model keys initialised from the file.
        missing: model keys left at their initial values (the embedding head at least).
        unexpected: file keys not used (ImageNet's ``fc`` classifier at least).
        mismatched: file keys whose shape differs from the model's, with both shapes.
    """

    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]


def load_torchvision_state_dict(
    model: ResNet, path_or_state_dict: str | os.PathLike[str] | dict[str, Tensor]
) -> LoadReport:
    """Initialises ``model`` from an ImageNet state dict in torchvision's key layout.

    ImageNet's 1000-class ``fc`` is skipped (the embedding ``fc`` stays as initialised). Keys
    the model lacks and keys of the wrong shape are reported rather than loaded. At least one
    backbone key must match, otherwise this is not a torchvision ResNet file and it raises.

    Args:
        model: a ``resnet34`` or ``resnet50`` from this module.
        path_or_state_dict: a ``.pth`` file saved by ``torch.save(torchvision_model.state_dict())``
            or the dict itself (a ``module.`` prefix from DataParallel is stripped).

    Returns:
        A ``LoadReport``; ``missing`` always contains the ``fc.*`` and ``features.*`` keys.
    """
    source = str(path_or_state_dict) if not isinstance(path_or_state_dict, dict) else "<dict>"
    if isinstance(path_or_state_dict, dict):
        state = path_or_state_dict
    else:
        state = torch.load(path_or_state_dict, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{source}: expected a state dict, got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    to_load: dict[str, Tensor] = {}
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    for key, value in state.items():
        if key.startswith("fc."):
            unexpected.append(key)  # the ImageNet classifier
        elif key not in own:
            unexpected.append(key)
        elif tuple(value.shape) != tuple(own[key].shape):
            mismatched.append((key, tuple(value.shape), tuple(own[key].shape)))
        else:
            to_load[key] = value
    if not to_load:
        raise ValueError(
            f"{source}: no key matches the {type(model).__name__} layout "
            f"(first file keys: {list(state)[:5]})"
        )
    model.load_state_dict(to_load, strict=False)
    missing = [k for k in own if k not in to_load]
    return LoadReport(sorted(to_load), missing, sorted(unexpected), mismatched)


def _variant(name: str, block: type[nn.Module], doc: str):
    """Registers ``name``: a :class:`ResNet` of ``block`` with 3-4-6-3 blocks per stage."""

    @register(name)
    def build(
        *, embedding_size: int = 512, dropout: float = 0.0, checkpointing: str = "none"
    ) -> ResNet:
        return ResNet(
            block,
            [3, 4, 6, 3],
            embedding_size=embedding_size,
            dropout=dropout,
            checkpointing=checkpointing,
        )

    build.__name__ = build.__qualname__ = name
    build.__doc__ = doc
    return build


resnet34 = _variant(
    "resnet34", BasicBlock, "ResNet-34 (BasicBlock 3-4-6-3) with a 512 -> D embedding head."
)
resnet50 = _variant(
    "resnet50", Bottleneck, "ResNet-50 (Bottleneck 3-4-6-3) with a 2048 -> D embedding head."
)
