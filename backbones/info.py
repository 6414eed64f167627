"""Parameter and multiply-accumulate (MAC) counts of a backbone at a given input size.

Owns the counting rules, implemented with forward hooks on a network built on the ``meta``
device (shapes only, no arithmetic, so even iresnet200 is counted instantly). Does not own
timing (see ``benchmarks/``).

What is counted, per sample (batch 1):
  * ``conv``: Conv2d, ``out_elements * (in_channels / groups) * kernel_h * kernel_w``
    (+ ``out_elements`` for a bias);
  * ``linear``: Linear, ``in_features * out_features`` (+ ``out_features`` for a bias);
  * ``attention``: the products a module computes with functional ops rather than
    submodules, declared by the module's ``functional_macs(inputs, output) -> (kind, macs)``:
    a ViT's attention gives ``q k^T`` plus ``attn v``, ``2 * N^2 * D`` per sample for N tokens
    of width D (arcface_torch's ``extra_gflops``);
  * ``norm``: BatchNorm (1d/2d) and LayerNorm, one MAC per element (the scale-and-shift);
  * ``activation``: PReLU one MAC per element (slope x input), SiLU/Sigmoid one per element;
    ReLU and ReLU6 are comparisons and count 0;
  * ``pool``: max/average pooling, one per input element.
``macs`` (the headline figure) is ``conv + linear + attention``, the convention papers use
(e.g. MobileFaceNet's 221M, InsightFace's "GFlops" for iResNet and its "ViT-T-1.5G"; the
convolutional networks have no attention term). ``macs_all`` adds the rest.
Not counted: residual additions, the squeeze-and-excitation product and mean, the attention
softmax, flatten, dropout.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

import backbones

KINDS = ("conv", "linear", "attention", "norm", "activation", "pool")
"""The kinds of :func:`count_macs`, in the order it reports them."""


@dataclass
class ModelInfo:
    """Counts for one network at one input size (per sample).

    Attributes:
        name: registry name.
        input_size: (H, W).
        embedding_size: D.
        params: all parameters (trainable or not).
        trainable_params: parameters with ``requires_grad``.
        macs: conv + linear + attention multiply-accumulates.
        by_kind: MACs per kind ("conv", "linear", "attention", "norm", "activation", "pool").
    """

    name: str
    input_size: tuple[int, int]
    embedding_size: int
    params: int
    trainable_params: int
    macs: int
    by_kind: dict[str, int] = field(default_factory=dict)

    @property
    def macs_all(self) -> int:
        """Every counted kind, not only conv + linear + attention."""
        return sum(self.by_kind.values())


def _numel(t: Tensor) -> int:
    return int(t.numel())


def _conv_macs(m: nn.Conv2d, out: Tensor) -> int:
    kh, kw = m.kernel_size
    per_output = (m.in_channels // m.groups) * kh * kw + (1 if m.bias is not None else 0)
    return _numel(out) * per_output


def _linear_macs(m: nn.Linear, out: Tensor) -> int:
    rows = _numel(out) // m.out_features
    return rows * (m.in_features * m.out_features + (m.out_features if m.bias is not None else 0))


def _kind_and_macs(m: nn.Module, inputs: tuple[Any, ...], out: Tensor) -> tuple[str, int] | None:
    declared = getattr(m, "functional_macs", None)
    if declared is not None:
        return declared(inputs, out)
    if isinstance(m, nn.Conv2d):
        return "conv", _conv_macs(m, out)
    if isinstance(m, nn.Linear):
        return "linear", _linear_macs(m, out)
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)):
        return "norm", _numel(out)
    if isinstance(m, (nn.PReLU, nn.SiLU, nn.Sigmoid)):
        return "activation", _numel(out)
    if isinstance(m, (nn.ReLU, nn.ReLU6)):
        return "activation", 0
    if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
        return "pool", _numel(inputs[0])
    return None


def count_macs(model: nn.Module, input_size: tuple[int, int]) -> dict[str, int]:
    """MACs per kind for one ``[1, 3, H, W]`` sample (see the module docstring for the rules).

    The model runs in eval mode on whatever device its parameters are on; build it on the
    ``meta`` device to count without computing.
    """
    counts: dict[str, int] = defaultdict(int)

    def hook(m: nn.Module, inputs: tuple[Any, ...], out: Any) -> None:
        if isinstance(out, Tensor):
            found = _kind_and_macs(m, inputs, out)
            if found is not None:
                counts[found[0]] += found[1]

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        with torch.no_grad():
            model(torch.zeros(1, 3, *input_size, device=device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {kind: counts.get(kind, 0) for kind in KINDS}


def model_info(
    name: str,
    input_size: tuple[int, int] = (112, 112),
    embedding_size: int = 512,
    **kwargs: Any,
) -> ModelInfo:
    """Builds ``name`` on the meta device and counts its parameters and MACs.

    Networks whose layers depend on the input size (those whose builder takes ``input_size``:
    iresnet, mobilefacenet, vit) are built for ``input_size``; the others ignore it at build
    time.
    """
    if "input_size" in (backbones.BACKBONES.keywords(name) or {}):
        kwargs.setdefault("input_size", tuple(input_size))
    with torch.device("meta"):
        model = backbones.get_backbone(name, embedding_size=embedding_size, **kwargs)
    by_kind = count_macs(model, tuple(input_size))
    return ModelInfo(
        name=name,
        input_size=(int(input_size[0]), int(input_size[1])),
        embedding_size=embedding_size,
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=by_kind["conv"] + by_kind["linear"] + by_kind["attention"],
        by_kind=by_kind,
    )


def human(n: float) -> str:
    """``43590848`` -> ``'43.59M'``; ``6.3e9`` -> ``'6.30G'``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def markdown_table(infos: list[ModelInfo]) -> str:
    """A markdown table of name, input, D, parameters and MACs."""
    lines = [
        "| network | input | D | parameters | MACs (conv+linear+attention) | MACs (all counted) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for i in infos:
        lines.append(
            f"| {i.name} | {i.input_size[0]}x{i.input_size[1]} | {i.embedding_size} | "
            f"{i.params:,} | {human(i.macs)} | {human(i.macs_all)} |"
        )
    return "\n".join(lines)
