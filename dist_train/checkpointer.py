"""What a training checkpoint holds, when it is written, and resuming from it.

Owns: the training state (backbone, optimizer, scaler, sampler position, every rank's RNG
state, the run's position and counters, the best metric, the world size and the resolved
config), the sharded loss state beside it (every rank writes its piece, tagged with class
ranges, so any world size can load the set), the save schedule (``checkpoint.every_steps``;
the trainer asks at epoch ends, at preemption and at the end) and restoring all of it
(``checkpoint.resume``), on the same or another world size. Does not own the file side (paths,
atomic writes, rotation, finding the newest valid file: :mod:`dist_train.checkpoint`) nor the
sampler's re-sharding arithmetic (:meth:`dist_train.data.samplers.EpochSampler.load_state_dict`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dist_train import checkpoint as ckpt
from dist_train.config import TrainConfig, to_dict
from dist_train.distributed import DistInfo, all_gather_object, barrier

if TYPE_CHECKING:
    from dist_train.data.samplers import EpochSampler
    from dist_train.train_eval import TrainEvaluator
    from dist_train.train_step import TrainStep

log = logging.getLogger(__name__)


def rng_state() -> dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA generator states."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves and restores a training run (collective: every rank calls every method).

    Args:
        cfg: the run's config (``output_dir``, ``checkpoint``; embedded in every checkpoint).
        dist_info: this process's place in the job.
        train_step: the step (its modules, optimizer, scaler, counters and the run's position).
        sampler: the training sampler (its position in the epoch).
        evaluator: the training evaluator (its best metric).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        dist_info: DistInfo,
        train_step: TrainStep,
        sampler: EpochSampler,
        evaluator: TrainEvaluator,
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.train_step = train_step
        self.sampler = sampler
        self.evaluator = evaluator
        self.run_dir = Path(cfg.output_dir)
        self._saved_step = -1

    def state(self) -> dict[str, Any]:
        """Everything but the sharded loss state (collective: every rank must call)."""
        ts, progress = self.train_step, self.train_step.progress
        return {
            "backbone": ts.backbone.state_dict(),
            "optimizer": ts.optimizer.state_dict(),
            "scaler": ts.scaler.state_dict(),
            "sampler": self.sampler.state_dict(progress.batches_in_epoch),
            "rng": all_gather_object(rng_state()),
            "step": progress.step,
            "epoch": progress.epoch,
            "batches_in_epoch": progress.batches_in_epoch,
            "skipped_total": ts.skipped_total,
            "best": self.evaluator.best,
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
        }

    def maybe_save(self) -> None:
        """Saves every ``checkpoint.every_steps`` steps."""
        every = self.cfg.checkpoint.every_steps
        if every and self.train_step.progress.step % every == 0:
            self.save()

    def save(self) -> Path:
        """Writes ``checkpoints/step_XXXXXXXX.pt`` and its loss shards, atomically.

        Every rank writes its piece of the sharded loss state (Partial FC rows and optimizer
        rows, tagged with their class ranges) to ``step_XXXXXXXX.shardRRR-of-WWW.pt``; rank 0
        writes the main file last, after a barrier, naming the shards and their class ranges
        (a resume opens only the shards of its classes), so a main file exists only when all its
        shards do. Any world size can load the set. A second save at the same step (an epoch
        end that is also a save step) writes nothing.
        """
        step = self.train_step.progress.step
        path = ckpt.checkpoint_path(self.run_dir, step)
        if self._saved_step == step:
            return path
        world = self.dist.world_size
        local = self.train_step.loss.local_state()
        ckpt.atomic_save(local, ckpt.shard_path(path, self.dist.rank, world))
        # the class ranges of every shard, so a resume opens only the files that overlap a rank
        shard_ranges = all_gather_object(ckpt.shard_ranges(local))
        state = self.state()
        barrier()  # every shard is on disk before the main file names them
        if self.dist.is_main:
            state["loss_shards"] = [ckpt.shard_path(path, r, world).name for r in range(world)]
            state["loss_shard_ranges"] = shard_ranges
            ckpt.atomic_save(state, path)
            ckpt.rotate(self.run_dir, self.cfg.checkpoint.keep_last)
            log.info("checkpoint %s", path)
        barrier()
        self._saved_step = step
        return path

    def resume(self) -> bool:
        """Restores the newest valid checkpoint when ``checkpoint.resume`` asks for it; False
        when there is none (a fresh run).

        Written by another world size, the sampler continues after the images already consumed
        (rounded down to a whole global batch) and the RNG states are left as seeded.
        """
        found = ckpt.find_resume(self.run_dir, self.cfg.checkpoint.resume)
        if found is None:
            return False
        path, state = found
        ts, progress = self.train_step, self.train_step.progress
        ts.backbone.load_state_dict(state["backbone"])
        ts.loss.load_pieces(ckpt.load_shards(path, state))
        ts.optimizer.load_state_dict(state["optimizer"])
        ts.scaler.load_state_dict(state["scaler"])
        progress.step, progress.epoch = int(state["step"]), int(state["epoch"])
        ts.skipped_total = int(state.get("skipped_total", 0))
        self.evaluator.best = state.get("best")
        progress.batches_in_epoch = self.sampler.load_state_dict(state["sampler"], reshard=True)
        same_world = int(state["world_size"]) == self.dist.world_size
        if same_world:
            set_rng_state(state["rng"][self.dist.rank])
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)%s",
            path,
            progress.step,
            progress.epoch,
            progress.batches_in_epoch,
            "" if same_world else f" written by {state['world_size']} processes",
        )
        return True
