"""The step buffers of Partial FC's fused kernel, kept across steps (:class:`Workspace`).

A buffer is reused only when nothing else holds it: these tests hold buffers the ways a
caller or autograd does and check that reuse never changes a value that is still alive.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from dist_train.losses import build_head
from dist_train.partial_fc import PartialFC, kernels
from dist_train.partial_fc.kernels import CosineCrossEntropy, Workspace

D = 8


def test_a_released_buffer_is_reused_and_a_held_one_never():
    ws, like = Workspace(), torch.zeros(1)
    a = ws.empty("g", (4, 3), like).fill_(1.0)
    b = ws.empty("g", (4, 3), like).fill_(2.0)  # `a` is held: a new buffer
    assert a.data_ptr() != b.data_ptr() and torch.all(a == 1.0)
    ptr = b.data_ptr()
    del a, b
    c = ws.empty("g", (2, 5), like)  # released, and large enough: reused
    assert c.data_ptr() == ptr and c.shape == (2, 5)
    part = c[1:]  # a view holds the storage too
    del c
    d = ws.empty("g", (2, 5), like).fill_(3.0)
    assert d.data_ptr() != ptr and part.data_ptr() == ptr + 5 * 4
    assert ws.empty("g", (2, 5), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64
    assert ws.empty("g", (4, 5), like).numel() == 20  # larger than any released buffer
    assert ws.empty("other", (2, 5), like).data_ptr() != d.data_ptr()


def test_a_copy_of_the_workspace_starts_empty():
    ws = Workspace()
    ws.empty("g", (4, 3), torch.zeros(1))
    assert copy.deepcopy(ws)._buffers == {}


def _problem(seed, s=11, n=6):
    gen = torch.Generator().manual_seed(seed)
    x_hat = F.normalize(torch.randn(n, D, generator=gen, dtype=torch.float64), dim=1)
    w = torch.randn(s, D, generator=gen, dtype=torch.float64)
    target = torch.randint(-1, s, (n,), generator=gen)  # -1: the class is on another shard
    return x_hat.requires_grad_(True), w.requires_grad_(True), target


def _run(head, problems, workspace):
    """Forwards of every problem first, then their backwards in reverse order."""
    losses = [
        CosineCrossEntropy.apply(x, w, t, head, None, None, workspace)[0] for x, w, t in problems
    ]
    for loss in reversed(losses):
        loss.backward()
    return [(loss.detach(), x.grad, w.grad) for loss, (x, w, _) in zip(losses, problems)]


@pytest.mark.parametrize("threshold", [0.0, 0.05])  # the two-sweep path, the general path
def test_forwards_before_backwards_match_fresh_buffers(monkeypatch, threshold):
    monkeypatch.setattr(kernels, "block_rows", lambda *args: 3)
    head = build_head("arcface", {"interclass_threshold": threshold}, 11)
    ws = Workspace()
    shared = _run(head, [_problem(0), _problem(1)], ws)
    fresh = _run(head, [_problem(0), _problem(1)], None)
    for got, want in zip(shared, fresh):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The gradients above are still held: a third step must not write into them.
    kept = [(gx.clone(), gw.clone()) for _, gx, gw in shared]
    third = _run(head, [_problem(2)], ws)[0][2]
    for (_, gx, gw), (kx, kw) in zip(shared, kept):
        assert torch.equal(gx, kx) and torch.equal(gw, kw)
        assert gw.data_ptr() != third.data_ptr()
    # Once released, the gradient's memory serves the next step (autograd kept it, no copy).
    ptr = third.data_ptr()
    del shared, third
    assert _run(head, [_problem(3)], ws)[0][2].data_ptr() == ptr


def test_partial_fc_keeps_a_held_gradient_and_reuses_a_released_one():
    pfc = PartialFC(build_head("arcface", {}, 40), D, 40, sample_rate=0.5, init_std=0.5)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, D, generator=gen), torch.randint(0, 40, (6,), generator=gen)
    pfc(x, y).backward()
    first = pfc.sampled_weight.grad
    kept = first.clone()
    pfc(x * 2, y).backward()
    assert torch.equal(first, kept)
    ptr = pfc.sampled_weight.grad.data_ptr()
    assert ptr != first.data_ptr()
    del first
    pfc.sampled_weight.grad = None
    pfc(x, y).backward()
    assert pfc.sampled_weight.grad.data_ptr() == ptr
