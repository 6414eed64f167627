"""Networks image -> embedding, one family per module, behind one registry.

Owns architectures only: no ``torch.distributed``, no knowledge of heads. Every backbone takes
a float tensor ``[B, 3, H, W]`` (already normalised) and returns ``[B, embedding_size]``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.registry import Registry

BACKBONES: Registry[nn.Module] = Registry("backbone")
register = BACKBONES.register


def get_backbone(name: str, embedding_size: int = 512, **kwargs: Any) -> nn.Module:
    """Builds the backbone registered as ``name``."""
    return BACKBONES.build(name, embedding_size=embedding_size, **kwargs)


def names() -> list[str]:
    """Names of every registered backbone."""
    return BACKBONES.names()


# Importing the family modules registers their builders.
from backbones import (  # noqa: E402,F401
    efficientnet,
    iresnet,
    mobilefacenet,
    resnet,
    thin_resnet,
    vit,
)
from backbones.weights import load_weights, read_state_dict  # noqa: E402,F401
