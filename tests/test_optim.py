import math

import pytest
import torch
from torch import nn

from dist_train.config import OptimConfig, SchedulerConfig
from dist_train.optim import LRSchedule, build_optimizer, param_groups


def test_poly_warmup_then_decay():
    s = LRSchedule(SchedulerConfig(name="poly", warmup_steps=4, power=2.0), 0.1, 14, 7)
    assert [s.factor(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert s.factor(4) == pytest.approx(1.0)
    assert s.factor(9) == pytest.approx((1 - 5 / 10) ** 2)
    assert s.factor(14) == pytest.approx(0.0)


def test_cosine_restarts_cycles_between_one_and_min():
    cfg = SchedulerConfig(name="cosine_restarts", cycle_epochs=2, min_lr=1e-5)
    s = LRSchedule(cfg, 1e-3, 100, 10)
    assert s.factor(0) == pytest.approx(1.0)
    assert s.factor(10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert s.factor(19) > 0.01 and s.factor(19) < 0.02
    assert s.factor(20) == pytest.approx(1.0)  # restart


def test_step_decay_at_milestones():
    s = LRSchedule(SchedulerConfig(name="step", milestones_epochs=[2, 4], gamma=0.1), 0.1, 60, 10)
    assert s.factor(19) == 1.0
    assert s.factor(20) == pytest.approx(0.1)
    assert s.factor(45) == pytest.approx(0.01)


def test_apply_sets_lr_with_group_scale():
    model = nn.Linear(3, 2)
    opt = build_optimizer(OptimConfig(name="sgd", lr=0.2), [model])
    opt.param_groups[0]["lr_scale"] = 0.5
    s = LRSchedule(SchedulerConfig(name="constant"), 0.2, 10, 10)
    assert s.apply(opt, 0.2, 3) == pytest.approx(0.2)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_no_decay_for_norms_and_biases():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.PReLU(4), nn.Linear(4, 2))
    groups = param_groups([model], 5e-4, no_decay_norm_bias=True)
    decayed = {id(p) for p in groups[0]["params"]}
    assert decayed == {id(model[0].weight), id(model[3].weight)}
    assert groups[1]["weight_decay"] == 0.0
    assert len(groups[1]["params"]) == 5  # conv bias, bn w/b, prelu, linear bias


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_build_optimizer_kinds(name):
    model = nn.Linear(3, 2)
    opt = build_optimizer(OptimConfig(name=name, lr=1e-3), [model])
    model(torch.randn(4, 3)).sum().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight)
    assert math.isclose(opt.param_groups[0]["lr"], 1e-3)


def test_all_frozen_raises():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        build_optimizer(OptimConfig(), [model])


def test_backbone_lr_scale_sets_the_backbone_groups_lr_and_not_the_heads():
    backbone = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    head = nn.Linear(4, 2)
    cfg = OptimConfig(name="sgd", lr=0.2, backbone_lr_scale=0.1, no_decay_norm_bias=True)
    opt = build_optimizer(cfg, [backbone], [head])
    groups = [(len(g["params"]), g["weight_decay"], g["lr_scale"]) for g in opt.param_groups]
    assert groups == [
        (1, cfg.weight_decay, 0.1),
        (3, 0.0, 0.1),
        (1, cfg.weight_decay, 1.0),
        (1, 0.0, 1.0),
    ]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.02, 0.02, 0.2, 0.2])
    s = LRSchedule(SchedulerConfig(name="poly", warmup_steps=2), 0.2, 10, 10)
    s.apply(opt, 0.2, 0)  # half-way through the warm-up: both scales follow the schedule
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.01, 0.1, 0.1])
    # one SGD step moves the backbone by lr * 0.1 and the head by lr
    x = torch.randn(8, 3)
    head(backbone(x)).sum().backward()
    w0, h0 = backbone[0].weight.detach().clone(), head.weight.detach().clone()
    gw, gh = backbone[0].weight.grad.clone(), head.weight.grad.clone()
    opt.step()
    wd = cfg.weight_decay
    torch.testing.assert_close(backbone[0].weight.detach(), w0 - 0.01 * (gw + wd * w0))
    torch.testing.assert_close(head.weight.detach(), h0 - 0.1 * (gh + wd * h0))


def test_backbone_lr_scale_one_keeps_one_group_per_weight_decay():
    backbone, head = nn.Linear(3, 4), nn.Linear(4, 2)
    opt = build_optimizer(OptimConfig(name="adam", lr=1e-3), [backbone], [head])
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 4
    assert opt.param_groups[0]["lr_scale"] == 1.0


@pytest.mark.parametrize("bad", [0.0, -0.5])
def test_backbone_lr_scale_must_be_positive(bad):
    from dist_train.config import ConfigError

    with pytest.raises(ConfigError, match="optim.backbone_lr_scale must be > 0"):
        OptimConfig(backbone_lr_scale=bad)
