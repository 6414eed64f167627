"""MetricLoss across 2 and 3 gloo ranks equals one process on the same global batch.

Each rank builds the whole problem from one seed in float64, computes the single-process
reference, then the distributed loss on its own ragged slice, and compares the loss, the
gradient of its local embeddings and the gradients of the head's parameters. All heads are
checked in one spawn per world size (a spawn costs seconds).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import heads
from dist_train.metric_loss import MetricLoss, gather_with_local_grad
from heads.metric import AMSoftmaxProto, AngleProtoLoss
from tests.dist_utils import run_distributed

SPLITS = {2: [5, 9], 3: [3, 6, 5]}  # ragged local batches of a 14-row global batch
EMPTY_SPLITS = {2: [0, 14], 3: [6, 0, 8]}  # one rank has no sample at all


def assert_close(actual, expected, msg=""):
    """float64 closeness without torch.testing: in a process with an initialised process
    group, torch.testing.assert_close imports torch.distributed.tensor (~5-10 s per process)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-7, atol=1e-7):
        diff = (actual - expected).abs().max().item() if actual.shape == expected.shape else None
        raise AssertionError(
            f"{msg}: shapes {tuple(actual.shape)} vs {tuple(expected.shape)}, max |diff| {diff}"
        )


class _MarginStandIn(nn.Module):
    """Only its kind matters here: the metric term of the combined head is what is gathered."""

    kind = "margin"

    def forward(self, cosine, labels):
        return cosine


def _head_cases():
    return [
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


@pytest.mark.parametrize("world", [2, 3])
def test_metric_loss_matches_single_process(world):
    per_rank = run_distributed(_check_all_heads, world)
    # the loss is identical on every rank
    assert all(r == per_rank[0] for r in per_rank)
    assert len(per_rank[0]) == 2 * len(_head_cases())


def test_metric_loss_single_process_is_the_head():
    x, labels = _global_problem()
    head = heads.get_head("triplet")
    torch.testing.assert_close(MetricLoss(head)(x, labels), head(x, labels))


def test_metric_loss_rejects_margin_heads_and_bad_shapes():
    with pytest.raises(ValueError, match="kind 'metric' or 'combined'"):
        MetricLoss(_MarginStandIn())
    with pytest.raises(ValueError, match="local_labels"):
        MetricLoss(heads.get_head("triplet"))(torch.randn(4, 3), torch.zeros(3, dtype=torch.long))
