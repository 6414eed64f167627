import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dist_train.collectives import all_gather_with_grad
from dist_train.distributed import (
    env_world_info,
    first_host,
    restart_namespace,
    shard_range,
)
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
    assert first_host("node1,node2") == "node1"
    assert first_host("a[1-3]") == "a1"
    assert first_host("a[07,09]") == "a07"


def _gather_grad(rank, world):
    # Ragged: rank r contributes r + 1 rows.
    x = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
    g = all_gather_with_grad(x)
    weights = torch.arange(g.shape[0], dtype=torch.float32).unsqueeze(1)
    (g * weights).sum().backward()
    return g.detach(), x.grad


@pytest.mark.slow
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


def test_restart_namespace_only_under_a_single_node_agent_store():
    agent = {
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "2",
        "LOCAL_WORLD_SIZE": "4",
        "WORLD_SIZE": "4",
    }
    assert restart_namespace(agent) == "dist_train/restart_2/"
    assert restart_namespace({**agent, "TORCHELASTIC_RESTART_COUNT": "0"}) == (
        "dist_train/restart_0/"
    )
    # several nodes: the agents' counts can disagree, so no prefix
    assert restart_namespace({**agent, "WORLD_SIZE": "8"}) is None
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (a fresh store each round), srun, plain env://
    assert restart_namespace({**agent, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert restart_namespace({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}) is None


# Round 0: both ranks join, then rank 1 dies (SIGKILL). Round 1 (the agent's restart): rank 0
# waits before creating its process group, so rank 1 looks its address up first. Without a
# per-round namespace it finds the dead round-0 rank's address and gloo fails with "Connection
# refused" (what CI hit in test_sigkilled_worker_restarts_from_last_checkpoint).
_RESTART_WORKER = """
    import os, signal, sys, time
    sys.path.insert(0, {repo!r})
    import torch.distributed as dist
    from dist_train.distributed import init_distributed
    restart, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
    if restart > 0 and rank == 0:
        time.sleep(2.0)
    init_distributed(timeout_s=60)
    dist.barrier()
    if restart == 0:
        if rank == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # stopped by the agent
    print(f"round {{restart}} rank {{rank}} ok", flush=True)
    dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_torchrun_restart_does_not_read_the_previous_rounds_store_keys(tmp_path):
    repo = str(Path(__file__).resolve().parents[1])
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(_RESTART_WORKER.format(repo=repo)))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "--monitor-interval=0.1",
        str(script),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-4000:]
    assert "round 1 rank 0 ok" in out and "round 1 rank 1 ok" in out, out[-4000:]
