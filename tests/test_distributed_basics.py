import pytest
import torch

from dist_train.collectives import all_gather_with_grad
from dist_train.distributed import _first_slurm_host, env_world_info, shard_range
from tests.dist_utils import run_distributed


@pytest.mark.parametrize("num_classes,world", [(11, 2), (11, 3), (10, 5), (3, 4), (0, 2)])
def test_shard_range_partitions_classes(num_classes, world):
    ranges = [shard_range(num_classes, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == num_classes
    for (_, b), (c, _) in zip(ranges, ranges[1:]):
        assert b == c
    sizes = [b - a for a, b in ranges]
    assert sizes == [num_classes // world + (r < num_classes % world) for r in range(world)]


def test_shard_range_rejects_bad_rank():
    with pytest.raises(ValueError):
        shard_range(10, 2, 2)


def test_env_world_info_torchrun_then_slurm_then_single():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "4",
        "MASTER_ADDR": "h",
        "MASTER_PORT": "1",
    }
    assert env_world_info(env) == (3, 1, 4, "h", "1")
    slurm = {
        "SLURM_PROCID": "5",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "8",
        "SLURM_JOB_NODELIST": "gpu[03-05,07]",
        "SLURM_JOB_ID": "1234",
    }
    rank, local, world, addr, port = env_world_info(slurm)
    assert (rank, local, world, addr, port) == (5, 1, 8, "gpu03", str(20000 + 1234))
    assert env_world_info({})[:3] == (0, 0, 1)


def test_first_slurm_host():
    assert _first_slurm_host("node1,node2") == "node1"
    assert _first_slurm_host("a[1-3]") == "a1"
    assert _first_slurm_host("a[07,09]") == "a07"


def _gather_grad(rank, world):
    # Ragged: rank r contributes r + 1 rows.
    x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
    g = all_gather_with_grad(x)
    weights = torch.arange(g.shape[0], dtype=torch.float32).unsqueeze(1)
    (g * weights).sum().backward()
    return g.detach(), x.grad


def test_all_gather_with_grad_sums_gradients_over_ranks():
    world = 3
    out = run_distributed(_gather_grad, world)
    sizes = [1, 2, 3]
    expected = torch.cat([torch.full((n, 2), float(i + 1)) for i, n in enumerate(sizes)])
    start = 0
    for rank, (g, grad) in enumerate(out):
        torch.testing.assert_close(g, expected)
        rows = torch.arange(start, start + sizes[rank], dtype=torch.float32).unsqueeze(1)
        # every rank computed the same loss, so the gradient is world x that of one loss
        torch.testing.assert_close(grad, world * rows.expand(-1, 2))
        start += sizes[rank]
