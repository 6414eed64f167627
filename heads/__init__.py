"""Loss maths: margin transforms on cosine logits and metric losses on a batch of embeddings.

Owns: one registry of heads, built by name from configs (``get_head(name, **kw)``). Every head
module has a ``kind`` attribute:

- ``"margin"``: called by :class:`dist_train.partial_fc.PartialFC` on one shard's sampled
  cosine logits ``[B_global, C_sampled]`` fp32 with labels ``[B_global]`` (``-1`` where the
  sample's class is not among this shard's sampled classes); returns scaled logits.
- ``"metric"``: called on the *global* batch of embeddings and labels (the caller gathers them
  across ranks); returns a scalar loss.
- ``"combined"``: has ``.margin``, ``.metric`` and ``.metric_weight``: a margin head inside
  Partial FC plus a weighted metric loss on the same embeddings.

Never calls ``torch.distributed``: the caller gathers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from core.registry import Registry

HEADS: Registry[nn.Module] = Registry("head")
register = HEADS.register


def get_head(name: str, **kwargs: Any) -> nn.Module:
    """Builds the head registered as ``name`` with keyword arguments."""
    return HEADS.build(name, **kwargs)


def names() -> list[str]:
    """Names of every registered head."""
    return HEADS.names()


# Importing the modules registers their heads.
from heads import margins, margins_adaptive, margins_magnitude, metric  # noqa: E402,F401
from heads.margins import CombinedMargin  # noqa: E402,F401
