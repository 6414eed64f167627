"""ShardedCenterLoss on 2 then 3 gloo ranks equals one process, and re-shards 2 → 3.

Every rank replays the single-process reference (plain tensors, float64) from one seed. Two
training steps run on 2 ranks (ragged local batches, 11 classes, one step where rank 0 owns no
sample of the batch); their state is saved and loaded into 3 ranks, which run a third step
where ranks 1 and 2 own no sample. Loss, local-embedding gradients, centre-shard gradients,
centres and optimizer rows are compared at every step, for both update rules.
"""

from __future__ import annotations

import os

import pytest
import torch

from dist_train.center_loss import ShardedCenterLoss
from tests.dist_utils import run_distributed
from tests.test_center_loss import ref_alpha_update

C, D, N = 11, 4, 14
SPLITS = {2: [5, 9], 3: [3, 6, 5]}
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


def _batch(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    low, high = [(0, C), (6, C), (0, 4)][step]  # step 1: no class of rank 0 of 2; step 2:
    labels = torch.randint(low, high, (N,), generator=g)  # none of ranks 1, 2 of 3
    return x, labels


def _initial_centres():
    return torch.randn(C, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def _ref_loss(x, labels, centres):
    return WEIGHT * (x - centres[labels]).pow(2).sum() / (2 * len(x))


def _run(rank, world, steps, load_path, save_path):
    sizes = SPLITS[world]
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    grad_m = ShardedCenterLoss(C, D, weight=WEIGHT, dtype=torch.float64)
    alpha_m = ShardedCenterLoss(C, D, update="alpha", alpha=ALPHA, dtype=torch.float64)
    if load_path:
        saved = torch.load(load_path)
        grad_m.load_state_dict(saved["gradient"])  # optimizer rows wait for the optimizer
        alpha_m.load_state_dict(saved["alpha"])
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
        x, labels = _batch(step)
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

    state = {"gradient": grad_m.state_dict(), "alpha": alpha_m.state_dict()}
    assert_close(state["gradient"]["centers"], ref_c.detach())
    assert_close(
        state["gradient"]["optimizer"]["rows"]["momentum_buffer"],
        ref_opt.state[ref_c]["momentum_buffer"],
    )
    assert_close(state["alpha"]["centers"], ref_alpha_c)
    if save_path and rank == 0:
        torch.save(state, save_path)
    return (grad_m.start, grad_m.stop), losses


@pytest.mark.slow  # two spawns (2 then 3 processes), each building a torch optimizer
def test_center_loss_matches_single_process_and_reshards_2_to_3(tmp_path):
    path = os.path.join(tmp_path, "center_loss.pt")
    two = run_distributed(_run, 2, [0, 1], "", path)
    assert [r[0] for r in two] == [(0, 6), (6, 11)]
    assert two[0][1] == two[1][1]  # identical loss on every rank
    three = run_distributed(_run, 3, [2], path, "")
    assert [r[0] for r in three] == [(0, 4), (4, 8), (8, 11)]
    assert three[0][1] == three[1][1] == three[2][1]
