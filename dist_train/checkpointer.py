"""What a training checkpoint holds, when it is written, and resuming from it.

Owns: the training state (backbone, optimizer, scaler, sampler position, every rank's RNG
state, the run's position and counters, the best metric, the world size and the resolved
config), the sharded loss state beside it (every rank writes its piece, tagged with class
ranges, so any world size can load the set), the save schedule (``checkpoint.every_steps``;
the trainer asks at epoch ends, at preemption and at the end) and restoring all of it
(``checkpoint.resume``), on the same or another world size, and the decision at the start of a
run whether its directory may be used (:func:`claim_run_dir`: continue the same run, start
fresh, move an old run aside, or stop). Does not own the file side (paths, atomic writes,
rotation, finding the newest valid file, moving files: :mod:`dist_train.checkpoint`) nor the
sampler's re-sharding arithmetic (:meth:`dist_train.data.samplers.EpochSampler.load_state_dict`).

A distillation teacher (:mod:`dist_train.distill`) is not part of the training state: it is
frozen and has no optimizer, so checkpoints hold neither its weights nor any optimizer state of
it; every start and resume reads it again from ``distill.teacher.weights``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dist_train import checkpoint as ckpt
from dist_train.config import ConfigError, TrainConfig, load_config, to_dict
from dist_train.distributed import DistInfo, all_gather_object, barrier

if TYPE_CHECKING:
    from dist_train.data.samplers import EpochSampler
    from dist_train.train_eval import TrainEvaluator
    from dist_train.train_step import TrainStep

log = logging.getLogger(__name__)

# Config keys that may differ between two starts of the same run: the directory itself, the
# run's length, how the global batch is split over processes and micro-steps (a restart may
# have another number of GPUs), how the class-sharded rows are stored (a state of any dtype
# loads into any other: a restart on fewer or smaller GPUs may need half precision), and
# settings that do not change what is trained (checkpoint schedule, logging, loader
# processes). Any other difference makes it another run.
RESTART_KEYS = frozenset(
    {
        "output_dir",
        "max_steps",
        "num_epochs",
        "grad_accum_steps",
        "data.batch_size",
        "log_every_steps",
        "checkpoint.resume",
        "checkpoint.every_steps",
        "checkpoint.keep_last",
        "data.num_workers",
        "data.prefetch_factor",
        "partial_fc.weight_dtype",
        "partial_fc.state_dtype",
        "head.params.center_loss_centers_dtype",
        "head.params.center_loss_state_dtype",
    }
)


def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """This process's Python, NumPy and torch generator states, and the CUDA generator of its
    own device only (``device``, default the current CUDA device): a rank resumed where it
    sees a different number of GPUs (``srun --gpus-per-task=1`` after torchrun) still finds
    its own state."""
    cuda = None
    if torch.cuda.is_available():
        cuda = torch.cuda.get_rng_state(device if device is not None else "cuda")
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def own_cuda_rng_state(saved: Any, local_rank: int) -> torch.Tensor | None:
    """The CUDA generator state of this rank's device in a saved :func:`rng_state` entry.

    Checkpoints hold one state (the rank's own device); older ones hold a list with every
    visible device's state, where the rank's own is the one of its torchrun device, index
    ``local_rank`` (modulo the list's length).
    """
    if saved is None or isinstance(saved, torch.Tensor):
        return saved
    states = list(saved)
    return states[local_rank % len(states)] if states else None


def set_rng_state(
    state: dict[str, Any], device: torch.device | None = None, local_rank: int = 0
) -> None:
    """Restores what :func:`rng_state` returned (the CUDA state into ``device``, default the
    current CUDA device; ``local_rank`` picks this rank's entry of an older all-devices list)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = own_cuda_rng_state(state.get("cuda"), local_rank)
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda, device if device is not None else "cuda")


@dataclass(frozen=True)
class RunStart:
    """How a run starts in its directory (the same on every rank).

    Attributes:
        resume: the ``checkpoint.resume`` value to use (``"auto"`` where a restart continues a
            run that ``"never"`` started).
        note: what was found or done, for the log (empty: nothing to say).
    """

    resume: str
    note: str = ""


def is_restart(environ: Mapping[str, str]) -> bool:
    """True in a process that torchrun restarted or in a requeued Slurm job."""
    return any(
        int(environ.get(k) or 0) > 0 for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT")
    )


def config_changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list:
    """``[(dotted key, old value, new value)]`` where two nested config dicts differ."""
    changes = []
    for key in [*old, *(k for k in new if k not in old)]:
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append((prefix + key, a, b))
    return changes


def _ways_out(run_dir: Path) -> str:
    return (
        f"start this run in a new output_dir, or set checkpoint.resume=never to move the old "
        f"run's files into {run_dir}/previous-<time>/"
    )


def decide_run_start(cfg: TrainConfig, *, restarted: bool = False) -> RunStart:
    """Decides from the files in ``cfg.output_dir`` how this run starts (rank 0 only).

    The directory is free (no :data:`dist_train.checkpoint.RUN_ENTRIES` in it), or holds this
    run (its ``config.yaml`` equals ``cfg`` apart from :data:`RESTART_KEYS`, and it has not
    finished), or holds another run (a finished one, a different config, files without a
    ``config.yaml``). ``resume="auto"`` or a checkpoint path may start in a free directory or
    continue this run; ``""`` needs a free directory; ``"never"`` moves any run aside first,
    except on a restart (``restarted``) of this run, which it continues as ``"auto"``.

    Raises:
        ConfigError: the directory may not be used; the message names it and the ways out.
    """
    run_dir = Path(cfg.output_dir)
    mode = cfg.checkpoint.resume
    if not ckpt.run_entries(run_dir):
        return RunStart(mode)
    finished = ckpt.finished_marker(run_dir)
    other, changed = _compare_run(cfg, run_dir)
    if mode == "never":
        if restarted and not other and finished is None:
            return RunStart("auto", f"restart: continuing the run in {run_dir} (resume=never)")
        moved = ckpt.move_aside(run_dir)
        return RunStart(mode, f"checkpoint.resume=never: the previous run's files are in {moved}")
    if finished is not None:
        raise ConfigError(f"{run_dir} holds a finished run ({finished.name}); {_ways_out(run_dir)}")
    if other:
        raise ConfigError(f"{run_dir} holds {other}; {_ways_out(run_dir)}")
    if not mode:
        raise ConfigError(
            f"{run_dir} holds this run's files but checkpoint.resume is empty (a fresh start in "
            f"a directory without a run); checkpoint.resume=auto continues the run, "
            f"checkpoint.resume=never moves its files aside, or use a new output_dir"
        )
    note = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in changed if k != "output_dir")
    return RunStart(mode, f"continuing the run in {run_dir} with {note}" if note else "")


def _compare_run(cfg: TrainConfig, run_dir: Path) -> tuple[str, list]:
    """(what makes the run in ``run_dir`` another run, or ``""``; its allowed changes)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return "files of a run without its config.yaml", []
    try:
        old = to_dict(load_config(saved))
    except ConfigError as exc:
        return f"a run whose config does not load here ({exc})", []
    changes = config_changes(old, to_dict(cfg))
    differs = [c for c in changes if c[0] not in RESTART_KEYS]
    if differs:
        shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in differs[:3])
        more = f" and {len(differs) - 3} more" if len(differs) > 3 else ""
        return f"another run (config differs at {shown}{more})", []
    return "", changes


def claim_run_dir(cfg: TrainConfig, dist_info: DistInfo) -> RunStart:
    """Rank 0 decides how the run starts in ``cfg.output_dir`` (:func:`decide_run_start`, which
    may move an old run aside); every rank gets the same answer (collective).

    Call it before anything writes into the run directory.

    Raises:
        ConfigError: on every rank, when the directory holds another run.
    """
    answer: tuple[str, Any] | None = None
    error: BaseException | None = None
    if dist_info.is_main:
        try:
            answer = ("ok", decide_run_start(cfg, restarted=is_restart(os.environ)))
        except ConfigError as exc:
            answer = ("config", str(exc))
        except Exception as exc:  # noqa: BLE001 - the other ranks must not wait for a decision
            answer, error = ("error", f"{type(exc).__name__}: {exc}"), exc
    kind, value = all_gather_object(answer)[0]
    if error is not None:
        raise error
    if kind == "config":
        raise ConfigError(value)
    if kind == "error":
        raise RuntimeError(f"rank 0 could not prepare the run directory {cfg.output_dir}: {value}")
    return value


class Checkpointer:
    """Saves and restores a training run (collective: every rank calls every method).

    Args:
        cfg: the run's config (``output_dir``, ``checkpoint``; embedded in every checkpoint).
        dist_info: this process's place in the job.
        train_step: the step (its modules, optimizer, scaler, counters and the run's position).
        sampler: the training sampler (its position in the epoch).
        evaluator: the training evaluator (its best metric).
        resume: the ``checkpoint.resume`` value to use (default: the config's; the trainer
            passes :attr:`RunStart.resume`).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        dist_info: DistInfo,
        train_step: TrainStep,
        sampler: EpochSampler,
        evaluator: TrainEvaluator,
        resume: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.train_step = train_step
        self.sampler = sampler
        self.evaluator = evaluator
        self.run_dir = Path(cfg.output_dir)
        self.resume_from = cfg.checkpoint.resume if resume is None else resume
        self._saved_step = -1

    def _cuda_device(self) -> torch.device | None:
        """This rank's GPU, whose generator is saved (None on CPU)."""
        return self.dist.device if self.dist.device.type == "cuda" else None

    def state(self) -> dict[str, Any]:
        """Everything but the sharded loss state (collective: every rank must call)."""
        ts, progress = self.train_step, self.train_step.progress
        return {
            "backbone": ts.backbone.state_dict(),
            "optimizer": ts.optimizer.state_dict(),
            "scaler": ts.scaler.state_dict(),
            "sampler": self.sampler.state_dict(progress.batches_in_epoch),
            "rng": all_gather_object(rng_state(self._cuda_device())),
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
            ckpt.rotate(self.run_dir, self.cfg.checkpoint.keep_last, written=path)
            log.info("checkpoint %s", path)
        barrier()
        self._saved_step = step
        return path

    def resume(self) -> bool:
        """Restores the newest valid checkpoint when ``checkpoint.resume`` asks for it; False
        when there is none (a fresh run). Collective: every rank must find the same file.

        Written by another world size, the sampler continues after the images already consumed
        (rounded down to a whole global batch) and the RNG states are left as seeded.
        """
        found = ckpt.find_resume(self.run_dir, self.resume_from)
        chosen = all_gather_object(None if found is None else str(found[0]))
        if len(set(chosen)) > 1:
            raise RuntimeError(f"ranks found different checkpoints to resume from: {chosen}")
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
            set_rng_state(state["rng"][self.dist.rank], self._cuda_device(), self.dist.local_rank)
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)%s",
            path,
            progress.step,
            progress.epoch,
            progress.batches_in_epoch,
            "" if same_world else f" written by {state['world_size']} processes",
        )
        return True
