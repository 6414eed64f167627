"""The optimizer factory and the learning-rate schedule.

Owns the one map from an optimizer name and its hyper-parameters (:class:`OptimSpec`) to an
update rule, for every optimizer of the project:

- :func:`make_optimizer`: the ``torch.optim`` optimizer (SGD with momentum/Nesterov, Adam,
  AdamW) over parameters or parameter groups: the backbone's (:func:`build_optimizer`, with
  optional weight-decay exclusion for normalisation parameters and biases and the backbone's
  learning-rate scale ``optim.backbone_lr_scale`` next to a metric head's) and the sharded
  center loss's (:meth:`dist_train.center_loss.ShardedCenterLoss.configure_optimizer`);
- :func:`row_state_names` and :func:`update_rows`: the same three rules applied to rows of a
  class-sharded matrix, with per-row state, used by the Partial FC optimizer
  (:class:`dist_train.partial_fc.PartialFCOptimizer`, which owns which rows a step touches).

Also owns :class:`LRSchedule`, a pure function of the optimizer step that the trainer applies to
every optimizer (backbone, Partial FC, center loss) by setting
``param_group["lr"] = base_lr * lr_scale * factor``. Does not own which parameters a module
trains or where optimizer state is saved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dist_train.config import OPTIMIZER_NAMES, OptimConfig, SchedulerConfig


@dataclass(frozen=True)
class OptimSpec:
    """An optimizer name and its hyper-parameters.

    Every field is read by the rule it applies to: ``momentum`` and ``nesterov`` by SGD,
    ``betas`` and ``eps`` by Adam/AdamW; ``weight_decay`` is L2 for SGD and Adam, decoupled for
    AdamW.
    """

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    nesterov: bool = False

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(f"optimizer {self.name!r} is not one of {', '.join(OPTIMIZER_NAMES)}")
        object.__setattr__(self, "betas", (float(self.betas[0]), float(self.betas[1])))

    @classmethod
    def from_config(cls, cfg: OptimConfig, *, lr_scale: float = 1.0) -> OptimSpec:
        """The spec of ``cfg`` with its learning rate multiplied by ``lr_scale``."""
        return cls(
            cfg.name,
            lr=cfg.lr * lr_scale,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            betas=tuple(cfg.betas),
            eps=cfg.eps,
            nesterov=cfg.nesterov,
        )

    def hyperparameters(self) -> dict[str, Any]:
        """Every field but ``name``, as keyword arguments."""
        out = dataclasses.asdict(self)
        del out["name"]
        return out


def make_optimizer(params: Iterable[Any], spec: OptimSpec) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer of ``spec`` over ``params`` (tensors or groups).

    A group's own ``weight_decay`` (or any other key) overrides the spec's.
    """
    if spec.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            weight_decay=spec.weight_decay,
            nesterov=spec.nesterov,
        )
    cls = torch.optim.Adam if spec.name == "adam" else torch.optim.AdamW
    return cls(params, lr=spec.lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)


def param_groups(
    modules: Iterable[nn.Module],
    weight_decay: float,
    no_decay_norm_bias: bool,
    lr_scale: float = 1.0,
) -> list[dict]:
    """Trainable parameters split into a decayed and (optionally) a non-decayed group.

    With ``no_decay_norm_bias``, parameters of normalisation layers and every 1-d parameter
    (biases, PReLU slopes, BN affine) get no weight decay. Every group carries ``lr_scale``
    (its learning rate relative to ``optim.lr``; see :meth:`LRSchedule.apply`).
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
    groups = [{"params": decay, "weight_decay": weight_decay, "lr_scale": lr_scale}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale})
    return [g for g in groups if g["params"]]


def build_optimizer(
    cfg: OptimConfig,
    modules: Iterable[nn.Module],
    head_modules: Iterable[nn.Module] = (),
) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW over the trainable parameters of the modules.

    Args:
        cfg: the optimizer settings.
        modules: the backbone's modules, trained at ``optim.lr * optim.backbone_lr_scale``.
        head_modules: head modules the same optimizer trains (a metric head's scale and
            bias), at ``optim.lr``.

    Groups with the same weight decay and learning-rate scale are merged (backbone first),
    so with ``backbone_lr_scale: 1`` there is one group per weight-decay setting.
    """
    groups: list[dict] = []
    for mods, scale in ((list(modules), cfg.backbone_lr_scale), (list(head_modules), 1.0)):
        for g in param_groups(mods, cfg.weight_decay, cfg.no_decay_norm_bias, scale):
            same = [
                h
                for h in groups
                if (h["weight_decay"], h["lr_scale"]) == (g["weight_decay"], g["lr_scale"])
            ]
            if same:
                same[0]["params"] += g["params"]
            else:
                groups.append(g)
    if not groups:
        raise ValueError("no trainable parameters: every backbone parameter is frozen")
    for g in groups:  # the schedule rescales it every step; right from the start too
        g["lr"] = cfg.lr * g["lr_scale"]
    return make_optimizer(groups, OptimSpec.from_config(cfg))


def row_state_names(spec: OptimSpec) -> tuple[str, ...]:
    """Per-row state of the rule of ``spec`` for :func:`update_rows`.

    ``momentum_buffer`` (SGD with momentum), ``exp_avg`` and ``exp_avg_sq`` ([rows, D], in the
    maths dtype) and ``step`` ([rows] int32: updates of the row so far) for Adam/AdamW.
    """
    if spec.name == "sgd":
        return ("momentum_buffer",) if spec.momentum > 0 else ()
    return ("exp_avg", "exp_avg_sq", "step")


def update_rows(
    name: str,
    w: torch.Tensor,
    g: torch.Tensor,
    state: dict[str, torch.Tensor],
    group: dict[str, Any],
) -> None:
    """In-place update of rows ``w`` [k, D] by the rule ``name``, as ``torch.optim`` does it.

    Args:
        name: ``"sgd"``, ``"adam"`` or ``"adamw"``.
        w: the rows, in the maths dtype; updated in place.
        g: their gradient (consumed: used as scratch).
        state: the rows' state (:func:`row_state_names`); updated in place.
        group: ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``betas``, ``eps``.
    """
    lr, wd = group["lr"], group["weight_decay"]
    if name == "sgd":
        if wd:
            g.add_(w, alpha=wd)
        mu = group["momentum"]
        if mu:
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(g)
            g = g.add_(buf, alpha=mu) if group["nesterov"] else buf
        w.add_(g, alpha=-lr)
        return
    beta1, beta2 = group["betas"]
    step = state["step"]
    step += 1
    t = step.to(torch.float64)
    # Per-row bias correction: a row updated k times is corrected for k steps.
    step_size = (lr / (1.0 - beta1**t)).to(w.dtype).unsqueeze(1)
    bc2_sqrt = (1.0 - beta2**t).sqrt().to(w.dtype).unsqueeze(1)
    if name == "adamw":
        w.mul_(1.0 - lr * wd)
    elif wd:
        g.add_(w, alpha=wd)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m.lerp_(g, 1.0 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = v.sqrt().div_(bc2_sqrt).add_(group["eps"])
    w.sub_(torch.div(m, denom).mul_(step_size))


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
