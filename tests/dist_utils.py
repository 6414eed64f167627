"""Spawning small gloo process groups on CPU for tests.

``run_distributed(fn, world_size, *args)`` runs ``fn(rank, world_size, *args)`` in
``world_size`` processes joined by a gloo group (file rendezvous), returns each rank's return
value in rank order, and re-raises the first failure with its traceback. ``fn`` must be a
module-level function (it is pickled by the spawn start method).
"""

from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, fn: Callable, args: tuple, queue) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
        )
        try:
            result = fn(rank, world_size, *args)
            # Plain pickle copies tensors by value; the queue's own pickler would share them
            # through file descriptors that vanish when this process exits.
            queue.put((rank, "ok", pickle.dumps(result)))
        finally:
            # Without this barrier a fast rank's teardown can abort a slow rank's collective.
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported to the parent with its traceback
        queue.put((rank, "error", traceback.format_exc()))


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout_s: float = 240) -> list:
    """Runs ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; returns the results."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(target=_worker, args=(r, world_size, init_file, fn, args, queue))
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        results: dict[int, Any] = {}
        errors = []
        try:
            for _ in range(world_size):
                rank, status, payload = queue.get(timeout=timeout_s)
                if status == "ok":
                    results[rank] = pickle.loads(payload)
                else:
                    errors.append(f"rank {rank} failed:\n{payload}")
                    break
        finally:
            for p in procs:
                p.join(timeout=5 if errors else 60)
                if p.is_alive():
                    p.kill()
        if errors:
            raise RuntimeError("\n".join(errors))
        return [results[r] for r in range(world_size)]


def proc_status(key: str) -> int:
    """A memory line of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)
