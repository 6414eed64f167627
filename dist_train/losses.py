"""The training objective assembled from the head config.

Owns the wiring between heads and the distributed machinery:

- a ``margin`` head -> :class:`dist_train.partial_fc.PartialFC` (sharded classifier) with it;
- a ``metric`` head -> :class:`dist_train.metric_loss.GlobalMetricLoss` (global batch);
- a ``combined`` head -> both, the metric part weighted by ``head.metric_weight``;
- ``head.params.center_loss_weight > 0`` adds a sharded center loss.

Every part returns a global-batch loss identical on all ranks (see :mod:`dist_train.trainer`).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

import heads
from dist_train.config import TrainConfig

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Keys of head.params consumed here rather than passed to the head builder.
_LOCAL_KEYS = ("center_loss_weight", "center_loss_lr_scale")


def _build_head(name: str, params: dict[str, Any], num_classes: int) -> nn.Module:
    builder = heads.HEADS.get(name)
    kwargs = dict(params)
    if "num_classes" in inspect.signature(builder).parameters and "num_classes" not in kwargs:
        kwargs["num_classes"] = num_classes
    return heads.get_head(name, **kwargs)


class TrainLoss(nn.Module):
    """Sum of the configured loss parts on one rank's micro-batch."""

    def __init__(self, cfg: TrainConfig, num_classes: int, device: torch.device) -> None:
        super().__init__()
        from dist_train.center_loss import ShardedCenterLoss
        from dist_train.metric_loss import GlobalMetricLoss
        from dist_train.partial_fc import PartialFC

        params = {k: v for k, v in cfg.head.params.items() if k not in _LOCAL_KEYS}
        head = _build_head(cfg.head.name, params, num_classes)
        kind = getattr(head, "kind", None)
        if kind not in ("margin", "metric", "combined"):
            raise ValueError(f"head {cfg.head.name!r} has no valid kind (got {kind!r})")
        d = cfg.backbone.embedding_size
        pcfg = cfg.partial_fc
        self.partial_fc: PartialFC | None = None
        self.metric: GlobalMetricLoss | None = None
        self.metric_weight = 1.0
        margin = head if kind == "margin" else getattr(head, "margin", None)
        if margin is not None:
            self.partial_fc = PartialFC(
                margin, d, num_classes, sample_rate=pcfg.sample_rate, update=pcfg.update,
                weight_dtype=_DTYPES[pcfg.weight_dtype],
            ).to(device)
            o = cfg.optim
            self.partial_fc.configure_optimizer(
                o.name, lr=o.lr * pcfg.lr_scale, momentum=o.momentum,
                weight_decay=o.weight_decay, betas=tuple(o.betas), eps=o.eps, nesterov=o.nesterov,
            )
        metric = head if kind == "metric" else getattr(head, "metric", None)
        if metric is not None:
            self.metric = GlobalMetricLoss(metric).to(device)
            self.metric_weight = float(getattr(head, "metric_weight", 1.0))
        self.center: ShardedCenterLoss | None = None
        self.center_weight = float(cfg.head.params.get("center_loss_weight", 0.0))
        self.center_lr_scale = float(cfg.head.params.get("center_loss_lr_scale", 1.0))
        if self.center_weight > 0:
            self.center = ShardedCenterLoss(num_classes, d).to(device)

    def forward(
        self, embeddings: torch.Tensor, labels: torch.Tensor, micro_step: int = 0,
        num_micro: int = 1,
    ) -> torch.Tensor:
        """Loss for local ``embeddings [B_local, D]`` fp32 and ``labels [B_local]``."""
        loss = embeddings.new_zeros(())
        if self.partial_fc is not None:
            loss = loss + self.partial_fc(embeddings, labels)
        if self.metric is not None:
            loss = loss + self.metric_weight * self.metric(embeddings, labels)
        if self.center is not None:
            loss = loss + self.center_weight * self.center(embeddings, labels)
        return loss

    def dense_module(self) -> nn.Module:
        """Parameters updated by the backbone's optimizer (metric-head scales, biases, …)."""
        return self.metric if self.metric is not None else nn.Module()

    def extra_optimizers(self) -> list[tuple[torch.optim.Optimizer, float]]:
        """(optimizer, lr scale relative to optim.lr) for the sharded parts."""
        out = []
        if self.partial_fc is not None:
            out.append((self.partial_fc.optimizer, 1.0))
        if self.center is not None:
            out.append((self.center.optimizer, self.center_lr_scale))
        return out

    def grads_finite(self) -> bool:
        """Whether this rank's sharded gradients are finite (checked before stepping)."""
        for opt, _ in self.extra_optimizers():
            for group in opt.param_groups:
                for p in group["params"]:
                    if p.grad is not None and not torch.isfinite(p.grad).all():
                        return False
        return True

    def world_size_free_state(self) -> dict[str, Any]:
        """State that loads into any world size (collective: every rank must call)."""
        state: dict[str, Any] = {}
        if self.partial_fc is not None:
            state["partial_fc"] = self.partial_fc.state_dict()
        if self.metric is not None:
            state["metric"] = self.metric.state_dict()
        if self.center is not None:
            state["center"] = self.center.state_dict()
        return state

    def load_world_size_free_state(self, state: dict[str, Any]) -> None:
        if self.partial_fc is not None:
            self.partial_fc.load_state_dict(state["partial_fc"])
        if self.metric is not None:
            self.metric.load_state_dict(state["metric"])
        if self.center is not None:
            self.center.load_state_dict(state["center"])


def build_loss(cfg: TrainConfig, num_classes: int, device: torch.device) -> TrainLoss:
    """The objective of ``cfg.head`` for ``num_classes`` identities."""
    return TrainLoss(cfg, num_classes, device)
