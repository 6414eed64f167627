"""Distributed bootstrap and rank bookkeeping.

Owns: reading the launcher's environment (torchrun, SLURM ``srun``, or nothing), creating the
process group (NCCL on CUDA, gloo on CPU), choosing this rank's device, and pure shard
arithmetic. Slurm host lists are parsed by :mod:`dist_train.slurm_hosts` (re-exported here as
``expand_nodelist`` and ``first_host``). Every helper is a no-op at world size 1, so
single-process code needs no branches.
Collectives that carry autograd live in :mod:`dist_train.collectives`, not here.
"""

from __future__ import annotations

import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from dist_train.device_setup import resolve_device_type

# The one Slurm host-list parser (re-exported): the bootstrap takes its master host from it.
from dist_train.slurm_hosts import expand_nodelist as expand_nodelist
from dist_train.slurm_hosts import first_host as first_host


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the rank that logs and writes files)."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def shard_range(num_classes: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous class range ``[start, stop)`` held by ``rank``.

    Rank r holds ``num_classes // world_size + (r < num_classes % world_size)`` classes, the
    first ``num_classes % world_size`` ranks one more than the others.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    if num_classes < 0:
        raise ValueError(f"num_classes must be >= 0, got {num_classes}")
    base, extra = divmod(num_classes, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def env_world_info(environ: dict[str, str] | None = None) -> tuple[int, int, int, str, str]:
    """(rank, local_rank, world_size, master_addr, master_port) from the launcher's variables.

    torchrun's ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` win; otherwise SLURM's ``SLURM_PROCID``/
    ``SLURM_LOCALID``/``SLURM_NTASKS`` with the first host of ``SLURM_JOB_NODELIST`` as master
    (for jobs started by ``srun`` directly, one task per GPU); otherwise a single process.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
        return (
            rank,
            local,
            world,
            env.get("MASTER_ADDR", "127.0.0.1"),
            env.get("MASTER_PORT", "29500"),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", "0"))
        addr = env.get("MASTER_ADDR") or first_host(
            env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1"))
        )
        # A port derived from the job id keeps two jobs on one node apart.
        port = env.get("MASTER_PORT") or str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return rank, local, world, addr, port
    return 0, 0, 1, "127.0.0.1", "29500"


def restart_namespace(environ: dict[str, str] | Any) -> str | None:
    """Key prefix that keeps one torchrun restart's process-group keys apart from the last's.

    torchrun's c10d rendezvous hands its workers the agent's own TCP store, which outlives the
    workers and is *not* cleared between restarts (``TORCHELASTIC_USE_AGENT_STORE=True``). After
    ``--max-restarts`` restarts a worker, a new rank can read the previous round's addresses
    (gloo) or unique id (NCCL) before the new owner overwrites them, and fails with "Connection
    refused" -- pytorch/pytorch#135712. With one agent (all ranks on this node) the restart
    count is a consistent round number, so ``restart_<count>/`` isolates each round. With several
    nodes the agents' counts can disagree (an agent restarted by a peer's failure does not count
    it), so there is no safe prefix: None, and :func:`init_distributed` warns instead; launch
    multi-node runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` (a fresh store every round),
    as ``launch/slurm/train_multinode.sbatch`` does.

    Returns:
        The prefix, or None when not under a torchrun agent store or not on a single node.
    """
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    count = environ.get("TORCHELASTIC_RESTART_COUNT")
    local_world = environ.get("LOCAL_WORLD_SIZE")
    if count is None or local_world is None or local_world != environ.get("WORLD_SIZE"):
        return None
    return f"dist_train/restart_{int(count)}/"


def _restart_store(environ, world_size: int, timeout: timedelta):
    """The agent's store under :func:`restart_namespace`, or None for ``init_method="env://"``."""
    prefix = restart_namespace(environ)
    if prefix is None:
        if (
            environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and environ.get("RANK") == "0"
            and int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
        ):
            warnings.warn(
                "multi-node torchrun with --max-restarts and a shared rendezvous store: a restart "
                "may read the previous round's process-group keys (pytorch/pytorch#135712); "
                "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun",
                stacklevel=3,
            )
        return None
    store = dist.TCPStore(
        environ["MASTER_ADDR"],
        int(environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(prefix, store)


def init_distributed(
    backend: str | None = None, timeout_s: float = 1800.0, device: str = "auto"
) -> DistInfo:
    """Creates the process group (when there is more than one process) and picks the device.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; by default NCCL on CUDA, else gloo.
        timeout_s: collective timeout.
        device: the config's ``device``: ``"auto"``, ``"cuda"`` or ``"cpu"``.

    Returns:
        This process's :class:`DistInfo`; its device is ``cuda:LOCAL_RANK`` on CUDA and
        ``cpu`` otherwise.

    Raises:
        DeviceUnavailableError: GPUs were requested but torch has no CUDA
            (:func:`dist_train.device_setup.resolve_device_type`), before any process group.
    """
    rank, local_rank, world_size, addr, port = env_world_info()
    use_cuda = resolve_device_type(device, torch.cuda.is_available()) == "cuda"
    if use_cuda:
        own = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(own)
    else:
        own = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", addr)
        os.environ.setdefault("MASTER_PORT", port)
        timeout = timedelta(seconds=timeout_s)
        backend = backend or ("nccl" if use_cuda else "gloo")
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            store=_restart_store(os.environ, world_size, timeout),
            # binds NCCL's communicator to this rank's GPU (no guessing from the current device)
            device_id=own if backend == "nccl" else None,
        )
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world_size, device=own)


def current_info(device: torch.device | None = None) -> DistInfo:
    """DistInfo of an already initialised process group (or a single process)."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank))
        return DistInfo(rank, local, world, device or torch.device("cpu"))
    return DistInfo(device=device or torch.device("cpu"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``sum``, ``max``, ``min`` or ``mean``); identity at world size 1."""
    if not is_initialized():
        return tensor
    if op == "mean":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
        return tensor
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    dist.all_reduce(tensor, op=ops[op])
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's Python object, in rank order (a one-element list at world size 1)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def cleanup() -> None:
    """Barrier then destroy the process group (the barrier keeps teardown from aborting).

    For the success path only: every rank must reach it. A failing rank calls :func:`abort`.
    """
    if is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def abort() -> None:
    """Tears the process group down without any collective (a failing rank's exit).

    The peers, blocked in a collective this rank will never join, get an error as soon as its
    connections close (gloo) or are stopped by the launcher (NCCL). A no-op without a group.
    """
    if not is_initialized():
        return
    try:
        # aborts NCCL communicators instead of waiting for their pending work; also gloo
        dist.distributed_c10d._abort_process_group()
    except Exception:  # noqa: BLE001 - a backend without abort: destroying is collective-free
        if is_initialized():
            dist.destroy_process_group()


def default_store() -> dist.Store:
    """The key-value store the process group was created with (needs a process group)."""
    return dist.distributed_c10d._get_default_store()


def free_port() -> int:
    """A free TCP port on localhost (for tests and single-node launches)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
