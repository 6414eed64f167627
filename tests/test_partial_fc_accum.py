"""Gradient accumulation through Partial FC: several forwards/backwards, then one step."""

from __future__ import annotations

import pytest
import torch

from tests.test_partial_fc import batch, make


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("update", ["sparse", "dense"])
def test_two_micro_steps_equal_one_big_batch_at_rate_one(update, state_dtype):
    # half state rounds to nearest here: both runs round the same fp64 values
    kw = {"update": update, "state_dtype": state_dtype, "stochastic_rounding": False}
    big, small = make(c=11, **kw), make(c=11, **kw)
    for pfc in (big, small):
        pfc.configure_optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=0.01)
    x, y = batch(n=8, c=11, seed=1)
    big(x, y).backward()
    big.optimizer.step()
    for part in (slice(0, 4), slice(4, 8)):
        (small(x[part], y[part]) / 2).backward()
    small.optimizer.step()
    torch.testing.assert_close(small.weight, big.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        small.optimizer.rows["momentum_buffer"], big.optimizer.rows["momentum_buffer"]
    )


def test_sampled_micro_steps_update_the_union_of_their_rows():
    pfc = make(c=40, rate=0.2)
    pfc.configure_optimizer("sgd", lr=0.1, momentum=0.0, weight_decay=0.0)
    before = pfc.weight.detach().clone()
    expected = before.clone()
    touched = set()
    for seed in (2, 3):
        x, y = batch(n=5, c=40, seed=seed)
        pfc(x, y).backward()
        idx = pfc.sampled_index
        expected[idx] -= 0.1 * pfc.sampled_weight.grad
        touched |= set(idx.tolist())
    assert len(pfc.optimizer.param_groups[0]["params"]) == 2
    pfc.optimizer.step()
    torch.testing.assert_close(pfc.weight, expected, rtol=1e-12, atol=1e-12)
    untouched = sorted(set(range(40)) - touched)
    assert untouched and torch.equal(pfc.weight[untouched], before[untouched])
    # after the step a new forward starts a new accumulation, even without zero_grad
    x, y = batch(n=5, c=40, seed=4)
    pfc(x, y).backward()
    assert len(pfc.optimizer.param_groups[0]["params"]) == 1
