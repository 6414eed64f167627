"""The training log line: loss, learning rate, throughput and ETA, to the log and TensorBoard.

Owns: the window of losses since the last log line, samples/s over that window, the ETA from
the rate since the start of this process's run, the ``step ... eta ...`` line every
``log_every_steps``, the ``train/*`` TensorBoard scalars and the run's hyper-parameters entry.
Does not own the TensorBoard writer's life on other ranks (:class:`TensorBoard` is a no-op off
rank 0) nor evaluation scalars (:mod:`dist_train.train_eval` writes those).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from dist_train.config import TrainConfig
from dist_train.logging_utils import TensorBoard, format_eta

if TYPE_CHECKING:
    from dist_train.train_step import TrainStep

log = logging.getLogger(__name__)


class Meter:
    """Throughput/ETA meter and logger of the training steps.

    Args:
        tb: the run's TensorBoard writer.
        log_every_steps: a line every this many steps (and at the last step).
        global_batch: images per optimizer step over all ranks.
    """

    def __init__(self, tb: TensorBoard, log_every_steps: int, global_batch: int) -> None:
        self.tb = tb
        self.log_every_steps = log_every_steps
        self.global_batch = global_batch
        self.start(0)

    def start(self, step: int) -> None:
        """Starts timing at ``step`` (the first step this process runs)."""
        self._t_last, self._step_last = time.time(), step
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._t_start, self._step_start = time.time(), step

    def log_step(self, loss: torch.Tensor | float, train_step: TrainStep, total_steps: int) -> None:
        """Adds a step's loss; every ``log_every_steps`` (and at ``total_steps``) logs the mean
        loss of the window, lr, samples/s, gradient norm and ETA, and the ``train/*`` scalars.

        The losses (0-d device tensors) are summed on the device; the sum and the gradient
        norm are read back at log steps only (each read is a host synchronisation).
        """
        # summed in float64 as a Python float would be: the logged mean does not depend on
        # where the sum is kept
        self._loss_sum = self._loss_sum + torch.as_tensor(loss).detach().to(torch.float64)
        self._loss_count += 1
        step = train_step.progress.step
        if not (step % self.log_every_steps == 0 or step == total_steps):
            return
        now = time.time()
        sps = (step - self._step_last) * self.global_batch / max(1e-9, now - self._t_last)
        rate = (step - self._step_start) / max(1e-9, now - self._t_start)
        eta = (total_steps - step) / max(1e-9, rate)
        mean_loss = float(self._loss_sum) / max(1, self._loss_count)  # host read: log steps only
        group = train_step.optimizer.param_groups[0]  # optim.lr x schedule, whatever its scale
        lr = group["lr"] / group.get("lr_scale", 1.0)
        grad_norm = float(train_step.last_grad_norm)
        epoch = train_step.progress.epoch
        log.info(
            "step %d/%d epoch %d loss %.4f lr %.3g samples/s %.1f grad_norm %.3g eta %s",
            step,
            total_steps,
            epoch,
            mean_loss,
            lr,
            sps,
            grad_norm,
            format_eta(eta),
        )
        values = {
            "train/loss": mean_loss,
            "train/lr": lr,
            "train/samples_per_s": sps,
            "train/grad_norm": grad_norm,
            "train/skipped_steps": float(train_step.skipped_total),
            "train/epoch": float(epoch),
        }
        scaler = train_step.scaler
        if scaler.is_enabled():
            values["train/loss_scale"] = float(scaler.get_scale())
        self.tb.scalars(values, step)
        self._t_last, self._step_last = time.time(), step
        self._loss_sum, self._loss_count = 0.0, 0

    def write_hparams(self, cfg: TrainConfig, metrics: dict[str, dict[str, float]]) -> None:
        """The run's main hyper-parameters with its final metrics (TensorBoard's HPARAMS tab);
        nothing without metrics."""
        flat = {f"{t}/{k}": v for t, m in metrics.items() for k, v in m.items()}
        hp = {
            "backbone": cfg.backbone.name,
            "head": cfg.head.name,
            "lr": cfg.optim.lr,
            "global_batch": self.global_batch,
            "sample_rate": cfg.partial_fc.sample_rate,
        }
        if flat:
            self.tb.hparams(hp, {f"hparam/{k}": v for k, v in flat.items()})

    def close(self) -> None:
        """Flushes and closes TensorBoard."""
        self.tb.close()
