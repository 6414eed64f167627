"""The training objective assembled from the head config.

Owns the wiring between heads and the distributed machinery:

- a ``margin`` head -> :class:`dist_train.partial_fc.PartialFC` (sharded classifier) with it;
- a ``metric`` head -> :class:`dist_train.metric_loss.MetricLoss` (global batch);
- a ``combined`` head -> both, the metric part weighted by ``head.metric_weight``;
- ``head.params.center_loss_weight > 0`` adds a sharded center loss.

Every part returns a global-batch loss identical on all ranks (see :mod:`dist_train.model_setup`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import heads
from dist_train.checkpoint import ShardFile
from dist_train.config import CENTER_LOSS_PARAMS, TrainConfig


def build_head(name: str, params: dict[str, Any], num_classes: int) -> nn.Module:
    """The head ``name`` of the registry with ``params``; ``num_classes`` if it takes one."""
    builder = heads.HEADS.get(name)
    kwargs = dict(params)
    if "num_classes" in inspect.signature(builder).parameters and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return heads.get_head(name, **kwargs)


class TrainLoss(nn.Module):
    """Sum of the configured loss parts on one rank's micro-batch.

    ``head.params`` may hold, besides the head's own arguments, the center-loss keys of
    :data:`dist_train.config.CENTER_LOSS_PARAMS`: ``center_loss_weight`` (λ of a sharded center
    loss added to the objective; 0 disables), ``center_loss_update`` (``"gradient"`` or
    ``"alpha"``), ``center_loss_alpha``, ``center_loss_lr_scale``, and the storage dtypes
    ``center_loss_centers_dtype`` and ``center_loss_state_dtype`` (default float32).
    """

    def __init__(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__()
        from dist_train.center_loss import ShardedCenterLoss
        from dist_train.metric_loss import MetricLoss
        from dist_train.partial_fc import PartialFC, build_partial_fc

        hp = cfg.head.params
        params = {k: v for k, v in hp.items() if k not in CENTER_LOSS_PARAMS}
        head = build_head(cfg.head.name, params, num_classes)
        kind = getattr(head, "kind", None)
        if kind not in ("margin", "metric", "combined"):
            raise ValueError(f"head {cfg.head.name!r} has no valid kind (got {kind!r})")
        d = cfg.backbone.embedding_size
        pcfg, o = cfg.partial_fc, cfg.optim
        self.kind = kind
        self.partial_fc_lr_scale = float(pcfg.lr_scale)
        self.partial_fc: PartialFC | None = None
        self.metric: MetricLoss | None = None
        # Only a combined head carries a margin part (a metric head may have a float `margin`).
        margin = head if kind == "margin" else head.margin if kind == "combined" else None
        if margin is not None:
            self.partial_fc = build_partial_fc(
                margin,
                pcfg,
                o,
                embedding_size=d,
                num_classes=num_classes,
                device=device,
                seed=cfg.seed,
            )
        if kind in ("metric", "combined"):
            # A combined head's forward is its weighted metric term.
            self.metric = MetricLoss(head).to(device)
        self.center: ShardedCenterLoss | None = None
        self.center_lr_scale = float(hp.get("center_loss_lr_scale", 1.0))
        center_weight = float(hp.get("center_loss_weight", 0.0))
        if center_weight > 0:
            update = str(hp.get("center_loss_update", "gradient"))
            self.center = ShardedCenterLoss(
                num_classes,
                d,
                update=update,
                alpha=float(hp.get("center_loss_alpha", 0.5)),
                weight=center_weight,
                dtype=str(hp.get("center_loss_centers_dtype", "float32")),
                state_dtype=str(hp.get("center_loss_state_dtype", "float32")),
                device=device,
            )
            if update == "gradient":
                self.center.configure_optimizer("sgd", lr=o.lr * self.center_lr_scale)

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        """Global-batch loss for local ``embeddings [B_local, D]`` fp32, ``labels [B_local]``."""
        loss = embeddings.new_zeros(())
        if self.partial_fc is not None:
            loss = loss + self.partial_fc(embeddings, labels)
        if self.metric is not None:
            loss = loss + self.metric(embeddings, labels)
        if self.center is not None:
            loss = loss + self.center(embeddings, labels)
        return loss

    def dense_module(self) -> nn.Module:
        """Parameters updated by the backbone's optimizer (metric-head scales, biases, …).

        The margin part of a combined head lives in Partial FC, which has its own optimizer.
        """
        if self.metric is None:
            return nn.Module()
        head = self.metric.head
        return head.metric if self.kind == "combined" else head

    def extra_optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """(optimizer, lr scale relative to optim.lr) for the sharded parts."""
        out: list[tuple[torch.optim.Optimizer, float]] = []
        if self.partial_fc is not None:
            out.append((self.partial_fc.optimizer, self.partial_fc_lr_scale))
        if self.center is not None and self.center.optimizer is not None:
            out.append((self.center.optimizer, self.center_lr_scale))
        return out

    def local_state(self) -> dict[str, Any]:
        """This rank's piece of the loss state; pieces of any world size load anywhere.

        Every rank calls it and saves its own piece: Partial FC and the center loss return
        their rows of this rank's classes (:mod:`dist_train.sharded_state`).
        """
        state: dict[str, Any] = {}
        if self.partial_fc is not None:
            state["partial_fc"] = self.partial_fc.shard_state()
        if self.metric is not None:
            state["metric"] = self.metric.state_dict()
        if self.center is not None:
            state["center"] = self.center.shard_state()
        return state

    def load_pieces(self, pieces: Sequence[ShardFile | dict[str, Any]]) -> None:
        """Loads the pieces written by every rank of a run of any world size.

        Args:
            pieces: per writing rank, its :meth:`local_state` or its checkpoint shard file.
                Of the files, only those whose classes overlap this rank's are opened (and
                read a chunk at a time); the replicated metric-head state comes from the first
                file opened.
        """

        def part(piece: ShardFile | dict[str, Any], name: str) -> Any:
            return piece.part(name) if isinstance(piece, ShardFile) else piece[name]

        if self.partial_fc is not None:
            self.partial_fc.load_shard_pieces([part(p, "partial_fc") for p in pieces])
        if self.center is not None:
            self.center.load_shard_pieces([part(p, "center") for p in pieces])
        if self.metric is not None:
            first = next((p for p in pieces if getattr(p, "opened", False)), pieces[0])
            content = first.open() if isinstance(first, ShardFile) else first
            self.metric.load_state_dict(content["metric"])


def build_loss(cfg: TrainConfig, num_classes: int, device: torch.device) -> TrainLoss:
    """The objective of ``cfg.head`` for ``num_classes`` identities."""
    return TrainLoss(cfg, num_classes, device)
