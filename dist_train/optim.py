"""Optimizers for the backbone (and any head parameters) and the learning-rate schedule.

Owns: building ``torch.optim`` optimizers from :class:`OptimConfig` with optional weight-decay
exclusion for normalisation parameters and biases, and :class:`LRSchedule`, a pure function of
the optimizer step that the trainer applies to every optimizer (backbone and Partial FC) by
setting ``param_group["lr"] = base_lr * lr_scale * factor``. The Partial FC optimizer is built by
:class:`dist_train.partial_fc.PartialFC` itself (it updates only sampled rows).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from dist_train.config import OptimConfig, SchedulerConfig


def param_groups(
    modules: Iterable[nn.Module], weight_decay: float, no_decay_norm_bias: bool
) -> list[dict]:
    """Trainable parameters split into a decayed and (optionally) a non-decayed group.

    With ``no_decay_norm_bias``, parameters of normalisation layers and every 1-d parameter
    (biases, PReLU slopes, BN affine) get no weight decay.
    """
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            is_norm = isinstance(sub, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm))
            for p in sub.parameters(recurse=False):
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                if no_decay_norm_bias and (is_norm or p.ndim <= 1):
                    no_decay.append(p)
                else:
                    decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0})
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: OptimConfig, modules: Iterable[nn.Module]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over the trainable parameters of ``modules``."""
    groups = param_groups(list(modules), cfg.weight_decay, cfg.no_decay_norm_bias)
    if not groups:
        raise ValueError("no trainable parameters: every backbone parameter is frozen")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)


class LRSchedule:
    """Learning-rate factor as a function of the optimizer step (0-based), stepped per step.

    - ``poly``: linear warm-up to 1, then ``(1 - t)^power`` decay to ``min_lr`` at the last step.
    - ``cosine_restarts``: after warm-up, cosine annealing from 1 to ``min_lr / lr`` over cycles
      of ``cycle_epochs`` epochs, restarting at 1 (SGDR with a constant cycle length).
    - ``step``: after warm-up, multiplied by ``gamma`` at each epoch in ``milestones_epochs``.
    - ``constant``: after warm-up, 1.

    Args:
        cfg: schedule settings.
        base_lr: peak learning rate (to express ``min_lr`` as a factor).
        total_steps: optimizer steps in the run.
        steps_per_epoch: optimizer steps per epoch.
    """

    def __init__(
        self, cfg: SchedulerConfig, base_lr: float, total_steps: int, steps_per_epoch: int
    ) -> None:
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.warmup = cfg.warmup_steps or int(round(cfg.warmup_epochs * self.steps_per_epoch))
        self.min_factor = cfg.min_lr / base_lr

    def factor(self, step: int) -> float:
        cfg = self.cfg
        if self.warmup > 0 and step < self.warmup:
            return (step + 1) / self.warmup
        t_step = step - self.warmup
        if cfg.name == "constant":
            return 1.0
        if cfg.name == "poly":
            span = max(1, self.total_steps - self.warmup)
            frac = min(1.0, t_step / span)
            return self.min_factor + (1.0 - self.min_factor) * (1.0 - frac) ** cfg.power
        if cfg.name == "cosine_restarts":
            cycle = max(1, int(round(cfg.cycle_epochs * self.steps_per_epoch)))
            pos = (t_step % cycle) / cycle
            return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1 + math.cos(math.pi * pos))
        # step decay
        epoch = step / self.steps_per_epoch
        n = sum(1 for m in cfg.milestones_epochs if epoch >= float(m))
        return cfg.gamma**n

    def apply(self, optimizer: torch.optim.Optimizer, base_lr: float, step: int) -> float:
        """Sets every group's lr to ``base_lr * group["lr_scale"] * factor(step)``; returns it."""
        lr = base_lr * self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        return lr
