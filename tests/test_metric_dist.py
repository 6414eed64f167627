"""Cross-rank losses on 2 and 3 gloo ranks equal one process on the same global batch.

One spawn per world size checks both cross-rank modules (a spawn costs seconds):

- :class:`dist_train.metric_loss.MetricLoss` with every metric head and the combined head:
  every rank builds the whole problem from one seed in float64, computes the single-process
  reference, then the distributed loss on its own ragged slice (also with one rank holding no
  sample), and compares the loss, its local-embedding gradient and the head's parameter
  gradients; a linear "backbone" whose gradients are summed over ranks (the trainer's DDP comm
  hook) gets the single-process gradient.
- :class:`dist_train.center_loss.ShardedCenterLoss`, both update rules, 11 classes: 2 ranks
  run steps 0 and 1 from the initial centres (rank 0 owns no sample of step 1) and their
  world-size-free state must equal that of one process running the module (2 -> 1); 3 ranks
  load the one-process state (1 -> 3 re-sharding of centres and SGD momentum rows) and run
  step 2, where ranks 1 and 2 own no sample. Loss, local-embedding gradients, centre-shard
  gradients, centres and optimizer rows are compared with a plain-tensor reference at every
  step.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

import heads
from dist_train.center_loss import ShardedCenterLoss
from dist_train.metric_loss import MetricLoss, gather_with_local_grad
from dist_train.sharded_state import full_rows
from heads.metric import AMSoftmaxProto, AngleProtoLoss
from tests.dist_utils import run_distributed
from tests.test_center_loss import ref_alpha_update

SPLITS = {2: [5, 9], 3: [3, 6, 5]}  # ragged local batches of a 14-row global batch
EMPTY_SPLITS = {2: [0, 14], 3: [6, 0, 8]}  # one rank has no sample at all
C, D, N = 11, 4, 14  # center loss: classes, embedding size, global batch
WEIGHT, LR, MOMENTUM, ALPHA = 0.5, 0.2, 0.9, 0.5


def assert_close(actual, expected, msg=""):
    """float64 closeness without torch.testing: in a process with an initialised process
    group, torch.testing.assert_close imports torch.distributed.tensor (~5-10 s per process)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-7, atol=1e-7):
        diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else None
        raise AssertionError(
            f"{msg}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}, max |diff| {diff}"
        )


# ---- MetricLoss ----


class _MarginStandIn(nn.Module):
    """Only its kind matters here: the metric term of the combined head is what is gathered."""

    kind = "margin"

    def forward(self, cosine, labels):
        return cosine


def _head_cases():
    cases = [
        ("contrastive", lambda: heads.get_head("contrastive", margin=1.1)),
        ("contrastive_semi_hard", lambda: heads.get_head("contrastive", miner="semi_hard")),
        ("triplet_batch_hard", lambda: heads.get_head("triplet", mining="batch_hard")),
        ("triplet_semi_hard", lambda: heads.get_head("triplet", mining="semi_hard", margin=0.5)),
        ("margin", lambda: heads.get_head("margin", seed=5, nu=0.01)),
        (
            "margin_per_class",
            lambda: heads.get_head("margin", beta_per_class=True, num_classes=7, seed=9),
        ),
        ("angleproto", lambda: heads.get_head("angleproto")),
        (
            "amsoftmax_proto",
            lambda: AMSoftmaxProto(_MarginStandIn(), AngleProtoLoss(init_w=8.0), 0.7),
        ),
    ]
    # a registered metric head without a case above runs with its defaults
    covered = {"contrastive", "triplet", "margin", "angleproto"}
    return cases + [
        (name, lambda name=name: heads.get_head(name))
        for name in heads.HEADS.names(kind="metric")
        if name not in covered
    ]


def _global_problem():
    g = torch.Generator().manual_seed(1234)
    labels = torch.arange(7).repeat_interleave(2)  # M = 2 per class for angleproto
    labels = labels[torch.randperm(14, generator=g)]
    x = torch.randn(14, 6, generator=g, dtype=torch.float64)
    return x, labels


def _loss_and_grads(head, fn, x):
    x = x.clone().requires_grad_(True)
    params = [p for p in head.parameters()]
    loss = fn(x)
    grads = torch.autograd.grad(loss, [x, *params])
    return loss.detach(), grads[0], grads[1:]


def _check_all_heads(rank, world):
    losses = _check_heads(rank, world, SPLITS[world], _head_cases())
    some = [c for c in _head_cases() if c[0] in ("triplet_semi_hard", "margin", "angleproto")]
    _check_heads(rank, world, EMPTY_SPLITS[world], some)
    _check_summed_backbone_gradient(rank, world)
    return losses


def _check_summed_backbone_gradient(rank, world):
    """A linear "backbone" whose gradients are summed over ranks (the trainer's DDP comm hook)
    gets the single-process gradient of the global metric loss."""
    sizes = SPLITS[world]
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    x, labels = _global_problem()
    images = torch.cat([x, x.flip(1)], dim=1)  # [14, 12] "images"
    weight = torch.randn(12, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    head = heads.get_head("contrastive", miner="semi_hard", miner_margin=0.5)
    ref_w = weight.clone().requires_grad_(True)
    head(images @ ref_w, labels).backward()
    w = weight.clone().requires_grad_(True)
    MetricLoss(head)(images[start:stop] @ w, labels[start:stop]).backward()
    grad = w.grad.clone()
    torch.distributed.all_reduce(grad)  # what the SUM comm hook does to backbone gradients
    assert_close(grad, ref_w.grad, msg=f"summed backbone gradient rank {rank}/{world}")


def _check_heads(rank, world, sizes, cases):
    start = sum(sizes[:rank])
    stop = start + sizes[rank]
    x, labels = _global_problem()
    # The gathered batch is the global batch in rank order, gradient only on our rows.
    gx, gl = gather_with_local_grad(x[start:stop].clone().requires_grad_(True), labels[start:stop])
    assert torch.equal(gx.detach(), x)
    assert torch.equal(gl, labels)
    losses = {}
    for name, build in cases:
        ref_head, dist_head = build().double(), build().double()
        dist_loss = MetricLoss(dist_head)
        for step in range(2):  # twice: random heads must stay in step across ranks
            ref = _loss_and_grads(ref_head, lambda t, h=ref_head: h(t, labels), x)
            got = _loss_and_grads(
                dist_head, lambda t, m=dist_loss: m(t[start:stop], labels[start:stop]), x
            )
            msg = f"{name} step {step} rank {rank}/{world} split {sizes}"
            assert_close(got[0], ref[0], msg=msg)
            # local-embedding gradient = the single-process gradient of our rows
            assert_close(got[1][start:stop], ref[1][start:stop], msg=msg)
            assert got[1][:start].abs().sum() == 0 and got[1][stop:].abs().sum() == 0, msg
            for g_param, r_param in zip(got[2], ref[2]):
                assert_close(g_param, r_param, msg=msg)
            assert ref[0] > 0, msg
            losses[f"{name}/{step}"] = got[0].item()
    return losses


# ---- ShardedCenterLoss ----


def _center_batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    low, high = [(0, C), (6, C), (0, 4)][step]  # step 1: no class of rank 0 of 2; step 2:
    labels = torch.randint(low, high, (N,), generator=g)  # none of ranks 1, 2 of 3
    return x, labels


def _initial_centres():
    return torch.randn(C, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _ref_loss(x, labels, centres):
    return WEIGHT * (x - centres[labels]).pow(2).sum() / (2 * len(x))


def _center_run(rank, world, steps, single_path):
    sizes = SPLITS[world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    grad_m = ShardedCenterLoss(C, D, weight=WEIGHT, dtype=torch.float64)
    alpha_m = ShardedCenterLoss(C, D, update="alpha", alpha=ALPHA, dtype=torch.float64)
    single = torch.load(single_path)  # one process's state after steps 0 and 1
    if min(steps) > 0:  # resume from it on this world size
        grad_m.load_shard_pieces([single["gradient"]])  # optimizer rows wait for the optimizer
        alpha_m.load_shard_pieces([single["alpha"]])
    else:
        with torch.no_grad():
            for m in (grad_m, alpha_m):
                m.centers_shard.copy_(_initial_centres()[m.start : m.stop])
    grad_m.configure_optimizer("sgd", lr=LR, momentum=MOMENTUM)

    ref_c = _initial_centres().requires_grad_(True)
    ref_opt = torch.optim.SGD([ref_c], lr=LR, momentum=MOMENTUM)
    ref_alpha_c = _initial_centres()
    losses = []
    for step in range(max(steps) + 1):
        x, labels = _center_batch(step)
        ref_x = x.clone().requires_grad_(True)
        ref_opt.zero_grad()
        ref_loss = _ref_loss(ref_x, labels, ref_c)
        ref_loss.backward()
        ref_ax = x.clone().requires_grad_(True)
        ref_alpha_loss = _ref_loss(ref_ax, labels, ref_alpha_c) / WEIGHT
        ref_alpha_loss.backward()
        ref_alpha_next = ref_alpha_update(x, labels, ref_alpha_c, ALPHA)
        if step in steps:
            msg = f"step {step} rank {rank}/{world}"
            local_x = x[lo:hi].clone().requires_grad_(True)
            grad_m.optimizer.zero_grad()
            loss = grad_m(local_x, labels[lo:hi])
            loss.backward()
            assert_close(loss, ref_loss.detach(), msg=msg)
            assert_close(local_x.grad, ref_x.grad[lo:hi], msg=msg)
            assert_close(grad_m.centers_shard.grad, ref_c.grad[grad_m.start : grad_m.stop], msg=msg)
            grad_m.optimizer.step()

            local_x = x[lo:hi].clone().requires_grad_(True)
            alpha_loss = alpha_m(local_x, labels[lo:hi])
            alpha_loss.backward()
            assert_close(alpha_loss, ref_alpha_loss.detach(), msg=msg)
            assert_close(local_x.grad, ref_ax.grad[lo:hi], msg=msg)
            assert_close(
                alpha_m.centers_shard, ref_alpha_next[alpha_m.start : alpha_m.stop], msg=msg
            )
            losses.append((loss.item(), alpha_loss.item()))
        ref_opt.step()
        ref_alpha_c = ref_alpha_next

    state = {"gradient": grad_m.gathered_shard_state(), "alpha": alpha_m.gathered_shard_state()}
    assert_close(full_rows(state["gradient"], "centers"), ref_c.detach())
    assert_close(
        full_rows(state["gradient"], "rows", "momentum_buffer"),
        ref_opt.state[ref_c]["momentum_buffer"],
    )
    assert_close(full_rows(state["alpha"], "centers"), ref_alpha_c)
    if max(steps) == 1:  # the same steps as the single process: the same state
        for rule in ("gradient", "alpha"):
            assert_close(
                full_rows(state[rule], "centers"), full_rows(single[rule], "centers"), msg=rule
            )
        for key in single["gradient"]["pieces"][0]["rows"]:
            rows = full_rows(single["gradient"], "rows", key)
            assert_close(full_rows(state["gradient"], "rows", key), rows, msg=key)
    return (grad_m.start, grad_m.stop), losses


def _single_process_states():
    """State of both update rules after steps 0 and 1, computed by one process (world 1)."""
    grad_m = ShardedCenterLoss(C, D, weight=WEIGHT, dtype=torch.float64)
    alpha_m = ShardedCenterLoss(C, D, update="alpha", alpha=ALPHA, dtype=torch.float64)
    with torch.no_grad():
        for m in (grad_m, alpha_m):
            m.centers_shard.copy_(_initial_centres())
    grad_m.configure_optimizer("sgd", lr=LR, momentum=MOMENTUM)
    for step in (0, 1):
        x, labels = _center_batch(step)
        grad_m.optimizer.zero_grad()
        grad_m(x, labels).backward()
        grad_m.optimizer.step()
        alpha_m(x, labels)
    return {"gradient": grad_m.shard_state(), "alpha": alpha_m.shard_state()}


def _worker(rank, world, center_steps, single_path):
    metric_losses = _check_all_heads(rank, world)
    return metric_losses, *_center_run(rank, world, center_steps, single_path)


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_cross_rank_losses_match_single_process(world, tmp_path):
    path = os.path.join(tmp_path, "center_loss_single_process.pt")
    torch.save(_single_process_states(), path)
    # 2 ranks: steps 0, 1 from scratch, state compared with the single process's;
    # 3 ranks: load the single process's state (1 -> 3 re-sharding), then step 2.
    out = run_distributed(_worker, world, [0, 1] if world == 2 else [2], path)
    metric_losses, shard_ranges, center_losses = zip(*out)
    assert all(r == metric_losses[0] for r in metric_losses)  # identical loss on every rank
    assert len(metric_losses[0]) == 2 * len(_head_cases())
    assert all(r == center_losses[0] for r in center_losses)
    assert list(shard_ranges) == [[(0, 6), (6, 11)], [(0, 4), (4, 8), (8, 11)]][world - 2]


def test_metric_loss_single_process_is_the_head():
    x, labels = _global_problem()
    head = heads.get_head("triplet")
    torch.testing.assert_close(MetricLoss(head)(x, labels), head(x, labels))


def test_metric_loss_rejects_margin_heads_and_bad_shapes():
    with pytest.raises(ValueError, match="kind 'metric' or 'combined'"):
        MetricLoss(_MarginStandIn())
    with pytest.raises(ValueError, match="local_labels"):
        MetricLoss(heads.get_head("triplet"))(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
