"""Pieces shared by every backbone family: gradient checkpointing, the fp32 embedding head
context, and argument checks.

Owns how a stage or a block is recomputed in backward and how the embedding layer is kept out
of autocast. It does not own any architecture: each family module builds its own layers and
calls these helpers from its ``forward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

CHECKPOINTING_MODES = ("none", "stage", "block")


def check_checkpointing(mode: str) -> str:
    """Validates a checkpointing mode and returns it.

    Raises:
        ValueError: ``mode`` is not one of "none", "stage" or "block".
    """
    if mode not in CHECKPOINTING_MODES:
        raise ValueError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {mode!r}")
    return mode


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``112`` -> ``(112, 112)``; ``(112, 96)`` stays as it is."""
    if isinstance(size, int):
        return (size, size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or (H, W), got {size!r}")
    return (int(size[0]), int(size[1]))


def make_divisible(value: float, divisor: int = 8) -> int:
    """Rounds a scaled channel count to a multiple of ``divisor``, never dropping more than 10%.

    The rule MobileNetV2 and EfficientNet use when width multipliers give fractional channels.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


@contextlib.contextmanager
def _keep_batchnorm_stats(module: nn.Module) -> Iterator[None]:
    """Restores BatchNorm running statistics after the block inside has run.

    Used as the recomputation context of checkpointing: the recomputed forward would otherwise
    apply the momentum update a second time, so a checkpointed run would end with different
    running statistics than an ordinary one.
    """
    saved = [
        (buf, buf.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        for buf in m.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


def _checkpoint_contexts(module: nn.Module) -> Callable[[], tuple[Any, Any]]:
    def context_fn() -> tuple[Any, Any]:
        return contextlib.nullcontext(), _keep_batchnorm_stats(module)

    return context_fn


def _checkpoint_active(x: Tensor) -> bool:
    # Recomputation only pays off when a graph is being recorded; tracing for export must see
    # plain modules.
    return (
        torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.jit.is_scripting()
        and not torch.onnx.is_in_onnx_export()
    )


def checkpointed(module: nn.Module, x: Tensor) -> Tensor:
    """``module(x)`` with its activations recomputed in backward instead of stored.

    Non-reentrant checkpointing (``use_reentrant=False``) so that inputs without
    ``requires_grad`` (the images) still give parameter gradients, and BatchNorm running
    statistics are restored after the recomputation so they match an ordinary run exactly.
    """
    if not _checkpoint_active(x):
        return module(x)
    return checkpoint(module, x, use_reentrant=False, context_fn=_checkpoint_contexts(module))


def run_stage(stage: nn.Module, x: Tensor, mode: str, atomic: bool = False) -> Tensor:
    """Runs one stage under a checkpointing mode.

    Args:
        stage: an ``nn.Sequential`` of blocks (or any module for "stage" mode).
        x: stage input ``[B, C, H, W]``.
        mode: "none" (plain), "stage" (recompute the whole stage), "block" (recompute each
            child of ``stage`` separately).
        atomic: the stage is a single block (a stem or head made of conv, BN and an in-place
            activation); "block" mode then recomputes it whole, since splitting it would let
            the in-place activation overwrite a tensor saved for recomputation.
    """
    if mode == "none" or not _checkpoint_active(x):
        return stage(x)
    if mode == "stage" or atomic or not isinstance(stage, nn.Sequential):
        return checkpointed(stage, x)
    for block in stage:
        x = checkpointed(block, x)
    return x


def run_stages(stages: list[nn.Module], x: Tensor, mode: str) -> Tensor:
    """Runs ``stages`` in order under a checkpointing mode; the first (the stem) is atomic."""
    for i, stage in enumerate(stages):
        x = run_stage(stage, x, mode, atomic=i == 0)
    return x


def init_conv_weights(module: nn.Module, nonlinearity: str = "leaky_relu") -> None:
    """He-normal (fan-out) weights and zero biases for every ``Conv2d`` in ``module``."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity=nonlinearity)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@contextlib.contextmanager
def autocast_off(device_type: str) -> Iterator[None]:
    """Disables autocast on ``device_type`` (if autocast exists there) for the block inside.

    The embedding layer runs in fp32 whatever the training precision (as arcface_torch does
    with its ``fp16`` flag): a 25k-wide fully connected layer and the final BatchNorm1d lose
    accuracy in half precision, and the classifier expects fp32 embeddings.
    """
    if torch.amp.is_autocast_available(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def upcast(x: Tensor) -> Tensor:
    """Half-precision tensors to float32; float32 and float64 stay as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def unregistered_view(owner: nn.Module, attr: str, *modules: nn.Module) -> nn.Sequential:
    """An ``nn.Sequential`` over modules ``owner`` already holds, stored outside its registry.

    For networks whose stem modules sit at the top level (to keep a reference state-dict
    layout, e.g. arcface_torch's ``conv1``/``bn1``/``prelu``): the view can be returned by
    ``stages()`` and checkpointed as one unit, yet adds no state-dict keys and no duplicate
    parameters, because it is set with ``object.__setattr__`` instead of being registered.
    ``.to()``, ``.train()`` and deep copies stay consistent since its members are the
    registered modules themselves.
    """
    view = nn.Sequential(*modules)
    object.__setattr__(owner, attr, view)
    return view
