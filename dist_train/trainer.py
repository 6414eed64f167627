"""The training run: builds the components from a :class:`TrainConfig` and calls them in order.

Owns: seeding, building (data, backbone + DDP, loss, the distillation teacher, optimizers,
schedule, scaler, the components) and the order of a run, :meth:`Trainer.fit`. The work lives
in components with one job each: the step with its optimizer and skip logic
(:mod:`dist_train.train_step`), checkpoints (:mod:`dist_train.checkpointer`), evaluation and
best-model keeping (:mod:`dist_train.train_eval`), the log line and TensorBoard scalars
(:mod:`dist_train.meter`).
It does not own any maths: margins live in ``heads/``, the sharded classifier in
:mod:`dist_train.partial_fc`, metrics in ``eval/``. How backbone gradients are scaled relative
to DDP's averaging is explained in :mod:`dist_train.model_setup`.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from dist_train.checkpointer import Checkpointer, claim_run_dir, rng_state, set_rng_state
from dist_train.config import TrainConfig, save_config
from dist_train.device_setup import apply_backend_flags, backend_flags, describe_device
from dist_train.distill import build_distiller
from dist_train.distributed import DistInfo
from dist_train.logging_utils import TensorBoard, setup_logging
from dist_train.losses import build_loss
from dist_train.meter import Meter
from dist_train.model_setup import allreduce_sum_hook, build_backbone, wrap_ddp
from dist_train.optim import LRSchedule, build_optimizer
from dist_train.precision import amp_dtype
from dist_train.train_eval import Results, TrainEvaluator
from dist_train.train_step import Progress, TrainStep, install_stop_handlers

if TYPE_CHECKING:
    from dist_train.data import TrainData

# build_backbone, rng_state and set_rng_state stay public names of this module too
__all__ = ["Trainer", "build_backbone", "rng_state", "seed_everything", "set_rng_state"]

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class Trainer:
    """Runs one training job; ``Trainer(cfg, dist_info).fit()``.

    Args:
        cfg: the resolved config.
        dist_info: this process's place in the job.
        data: the training data (default: :func:`dist_train.data.build_train_data` from
            ``cfg.data``); any object with ``loader``, ``sampler``, ``num_classes`` and
            ``num_images``, e.g. batches already in memory.
    """

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo, *, data: TrainData | None = None):
        from dist_train.data import build_train_data

        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.output_dir)
        # Before anything writes into the run directory (train.log is the first): continue the
        # same run, start fresh, move an old run aside (resume=never) or stop (another run).
        start = claim_run_dir(cfg, dist_info)
        setup_logging(self.run_dir, dist_info.is_main, dist_info.rank)
        if start.note:
            log.info("%s", start.note)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # TF32 matmuls/convolutions and cudnn.benchmark on CUDA (nothing on CPU)
        apply_backend_flags(
            backend_flags(self.device.type, tf32=cfg.tf32, deterministic=cfg.deterministic)
        )
        log.info(describe_device(self.device, dist_info.world_size))
        # Same seed on every rank: identical initial backbones (DDP also broadcasts rank 0's).
        seed_everything(cfg.seed)
        self.data = data if data is not None else build_train_data(cfg.data, dist_info, cfg.seed)
        self.num_classes = self.data.num_classes
        self.backbone = build_backbone(cfg, self.device)
        self.model: nn.Module = self.backbone
        if dist_info.is_distributed:
            self.model = wrap_ddp(self.backbone, self.device)
            self.model.register_comm_hook(None, allreduce_sum_hook)
        self.loss = build_loss(cfg, self.num_classes, self.device)
        # knowledge distillation: a frozen teacher, outside DDP, the optimizers and checkpoints
        self.distill = build_distiller(cfg, self.device)
        self.optimizer = build_optimizer(cfg.optim, [self.backbone], [self.loss.dense_module()])
        # Every optimizer the schedule drives: (optimizer, its base lr).
        self.optimizers: list[tuple[torch.optim.Optimizer, float]] = [
            (self.optimizer, cfg.optim.lr)
        ] + [(opt, cfg.optim.lr * scale) for opt, scale in self.loss.extra_optimizers()]
        batches = len(self.data.loader)
        self.steps_per_epoch = max(1, batches // cfg.grad_accum_steps)
        if batches < cfg.grad_accum_steps:
            raise ValueError(
                f"an epoch has {batches} batches per rank, fewer than "
                f"grad_accum_steps={cfg.grad_accum_steps}"
            )
        self.total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * self.steps_per_epoch)
        self.schedule = LRSchedule(
            cfg.scheduler, cfg.optim.lr, self.total_steps, self.steps_per_epoch
        )
        self.amp_dtype = amp_dtype(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.global_batch = cfg.data.batch_size * dist_info.world_size * cfg.grad_accum_steps
        self.progress = Progress()
        self.train_step = TrainStep(
            cfg,
            model=self.model,
            backbone=self.backbone,
            loss=self.loss,
            optimizers=self.optimizers,
            schedule=self.schedule,
            scaler=self.scaler,
            amp_dtype=self.amp_dtype,
            device=self.device,
            progress=self.progress,
            distill=self.distill,
        )
        tb = TensorBoard(self.run_dir / "tensorboard", cfg.tensorboard and dist_info.is_main)
        self.meter = Meter(tb, cfg.log_every_steps, self.global_batch)
        self.evaluator = TrainEvaluator(cfg, dist_info, self.backbone, tb, self.progress)
        self.checkpointer = Checkpointer(
            cfg, dist_info, self.train_step, self.data.sampler, self.evaluator, start.resume
        )
        if dist_info.is_main:
            save_config(cfg, self.run_dir / "config.yaml")
        nparams = sum(p.numel() for p in self.backbone.parameters())
        log.info(
            "%s: %.2fM parameters; %d classes, %d images; world size %d, global batch %d; "
            "%d steps (%d per epoch)",
            cfg.backbone.name,
            nparams / 1e6,
            self.num_classes,
            self.data.num_images,
            dist_info.world_size,
            self.global_batch,
            self.total_steps,
            self.steps_per_epoch,
        )

    @property
    def step(self) -> int:
        """Optimizer steps done."""
        return self.progress.step

    @property
    def last_metrics(self) -> Results:
        """The latest evaluation's results (``target -> metric -> value``)."""
        return self.evaluator.last_metrics

    # ---------------------------------------------------------------------------------------
    def fit(
        self,
        *,
        on_step: Callable[[float], None] | None = None,
        on_evaluate: Callable[[str, Results], None] | None = None,
        finish: bool = True,
    ) -> Results:
        """Trains to ``total_steps``; returns the last evaluation's metrics.

        Args:
            on_step: called with each step's loss right after the step.
            on_evaluate: called with ``(tag, results)`` after every evaluation of
                ``eval.targets`` (``tag`` is ``"initial"`` for the baseline, else empty).
            finish: run the end of the run (:meth:`finish`); False leaves it out, and
                TensorBoard open, so that ``fit`` can be called again with a larger
                ``total_steps`` (as the trainer benchmark times steps).
        """
        self.evaluator.on_evaluate = on_evaluate
        # resume from the newest checkpoint of this run (checkpoint.resume, default auto)
        self.checkpointer.resume()
        # SIGTERM / SIGUSR1 (SLURM preemption) ask for a checkpoint and a clean exit
        install_stop_handlers(self.train_step.request_stop)
        # the baseline evaluation before the first step (eval.at_start)
        self.evaluator.maybe_evaluate_initial()
        self.meter.start(self.step)
        batches: Iterator | None = None
        while self.step < self.total_steps:
            # this epoch's batches, in the sampler's order for the epoch
            if batches is None:
                batches = self.epoch_batches()
            # one optimizer step over grad_accum_steps micro-batches
            loss = self.train_step(batches)
            if loss is None:
                # the epoch ran out of whole steps: its evaluation and checkpoint, next epoch
                self.end_epoch()
                batches = None
                continue
            if on_step is not None:
                on_step(float(loss))  # a host read, only for a caller that asks for each loss
            # log line and TensorBoard scalars every log_every_steps
            self.meter.log_step(loss, self.train_step, self.total_steps)
            # evaluation every eval.every_steps
            self.evaluator.maybe_evaluate()
            # checkpoint every checkpoint.every_steps
            self.checkpointer.maybe_save()
            # preemption: every rank agreed to stop; checkpoint and leave
            if self.train_step.stop_agreed:
                self.stop()
                return self.last_metrics
        # the end of the run: final evaluation, weights, checkpoint, test evaluation
        if finish:
            self.finish()
        return self.last_metrics

    def epoch_batches(self) -> Iterator:
        """An iterator over the current epoch's batches (from the resume position)."""
        self.data.sampler.set_epoch(self.progress.epoch)
        return iter(self.data.loader)

    def end_epoch(self) -> None:
        """Moves to the next epoch; evaluates and/or checkpoints if configured."""
        self.progress.epoch += 1
        self.progress.batches_in_epoch = 0
        self.evaluator.evaluate_epoch_end()
        if self.cfg.checkpoint.at_epoch_end:
            self.checkpointer.save()

    def stop(self) -> None:
        """Every rank agreed to stop (a preemption signal): checkpoint, close, leave."""
        self.checkpointer.save()
        log.warning("stopped by signal %s at step %d", self.train_step.stop_signal, self.step)
        self.meter.close()

    def finish(self) -> None:
        """Final evaluation, backbone weights file, full checkpoint, test evaluation."""
        # evaluation of the last weights: metrics.json and model.pt
        self.evaluator.evaluate_final()
        path = self.checkpointer.save()
        if self.dist.is_main:
            self.meter.write_hparams(self.cfg, self.last_metrics)
            log.info("weights %s, checkpoint %s", self.run_dir / "model.pt", path)
        # the test targets, scored with the best weights
        self.evaluator.evaluate_test()
        self.meter.close()
