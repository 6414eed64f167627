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
