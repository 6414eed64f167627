"""One optimizer step of training, and the agreement of all ranks to skip it or to stop.

Owns: the run's position (:class:`Progress`), the step (learning rate from the schedule,
``grad_accum_steps`` micro-batches of forward and backward under autocast, normalised on the
device), the optimizer step with its skip logic (a non-finite gradient on any rank skips the step
on every rank; too many in a row stop the run), and stop requests (preemption signals), which
every rank agrees on in the same all-reduce. That one flag tensor, read once, is the step's only
host synchronisation (docs/cluster.md, "Host synchronisation"); the loss stays on the device.
Does not own building the modules, optimizers,
schedule or scaler (:class:`dist_train.trainer.Trainer` builds them), the loss maths
(:mod:`dist_train.losses`, the distillation term of :mod:`dist_train.distill`) nor what
happens between steps (logging, evaluation, checkpoints).
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
from collections.abc import Callable, Iterator
from dataclasses import KW_ONLY, dataclass, field

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from dist_train.collectives import equal_local_batches
from dist_train.config import TrainConfig
from dist_train.data.transforms import normalize
from dist_train.distill import Distiller
from dist_train.distributed import all_reduce
from dist_train.optim import LRSchedule

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where the run is; checkpointed and restored by :mod:`dist_train.checkpointer`."""

    step: int = 0
    """Optimizer steps done (skipped ones included)."""
    epoch: int = 0
    batches_in_epoch: int = 0
    """Batches (micro-batches) of this rank consumed in the current epoch."""


@dataclass(eq=False, repr=False)
class TrainStep:
    """``train_step(batches)``: one optimizer step over ``grad_accum_steps`` micro-batches.

    Built by the trainer from the modules it trains; the counters and the stop request start
    empty.
    """

    cfg: TrainConfig
    """The run's config (``grad_accum_steps``, ``max_skipped_steps``, the input normalisation,
    ``backbone.channels_last``, ``optim.grad_clip_norm``)."""
    _: KW_ONLY
    model: nn.Module
    """The backbone as trained (DDP-wrapped under a process group)."""
    backbone: nn.Module
    """The bare backbone (its gradients are clipped and checked)."""
    loss: nn.Module
    """The loss module (:func:`dist_train.losses.build_loss`)."""
    optimizers: list[tuple[torch.optim.Optimizer, float]]
    """Every optimizer the schedule drives, with its base learning rate; the backbone's first."""
    schedule: LRSchedule
    scaler: torch.amp.GradScaler
    """Enabled for fp16 only."""
    amp_dtype: torch.dtype | None
    """The autocast dtype, ``None`` for full precision."""
    device: torch.device
    """Where batches go."""
    progress: Progress
    """The run's position, advanced here."""
    distill: Distiller | None = None
    """The frozen teacher whose distillation term is added to each micro-batch's loss."""
    skipped_total: int = field(default=0, init=False)
    """Steps skipped for a non-finite loss or gradient (checkpointed)."""
    skipped_in_row: int = field(default=0, init=False)
    """Consecutive skips that count towards ``max_skipped_steps``."""
    last_grad_norm: torch.Tensor = field(default_factory=lambda: torch.zeros(()), init=False)
    """The backbone's gradient norm of the last step (before clipping)."""
    stop_signal: int | None = field(default=None, init=False)
    """The signal of a stop request on this rank (:meth:`request_stop`)."""
    stop_agreed: bool = field(default=False, init=False)
    """Every rank saw a stop request (set by :meth:`optimizer_step`)."""

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The backbone's optimizer (its learning rate is the one logged)."""
        return self.optimizers[0][0]

    def request_stop(self, signum: int) -> None:
        """Asks for a stop; every rank agrees on it in the next optimizer step's all-reduce."""
        self.stop_signal = signum

    def __call__(self, batches: Iterator) -> torch.Tensor | None:
        """One optimizer step; returns the (unscaled) loss, or None at the end of the epoch.

        The loss is a 0-d tensor on the device, NaN for a skipped step; it is not read here
        (reading it costs a host synchronisation: :class:`dist_train.meter.Meter` reads the
        window's sum at log steps only).
        """
        cfg = self.cfg
        k = cfg.grad_accum_steps
        micro = []
        for _ in range(k):
            try:
                micro.append(next(batches))
            except StopIteration:
                return None
        self.model.train()
        self.loss.train()
        for lr_opt, base in self.optimizers:
            self.schedule.apply(lr_opt, base, self.progress.step)
        total = torch.zeros((), device=self.device)
        # Batches are drop_last: every rank has the same micro-batch size, so the gathers of
        # the loss exchange no sizes and reduce-scatter their gradients.
        with equal_local_batches():
            for i, (images, labels) in enumerate(micro):
                # The loader's batch is a channels_last-strided view; the input takes the
                # model's memory format (converted as uint8: a quarter of the bytes of a float
                # copy), so DDP's gradient buckets match the parameters' strides.
                fmt = torch.channels_last if cfg.backbone.channels_last else torch.contiguous_format
                images = images.to(self.device, non_blocking=True).contiguous(memory_format=fmt)
                labels = labels.to(self.device, non_blocking=True)
                x = normalize(images, cfg.data.mean, cfg.data.std)  # keeps the memory format
                # DDP syncs gradients only on the last micro-step (no_sync accumulates locally).
                sync = i == k - 1 or not isinstance(self.model, DDP)
                ctx = contextlib.nullcontext() if sync else self.model.no_sync()
                with ctx:
                    with torch.autocast(
                        self.device.type,
                        dtype=self.amp_dtype or torch.float32,
                        enabled=self.amp_dtype is not None,
                    ):
                        embeddings = self.model(x)
                    # The classifier and its softmax run in fp32 whatever the autocast dtype.
                    loss = self.loss(embeddings.float(), labels)
                    if self.distill is not None:
                        # the teacher runs on this rank's micro-batch only, under no_grad
                        loss = loss + self.distill(x, embeddings.float())
                    loss = loss / k
                    self.scaler.scale(loss).backward()
                total += loss.detach()
        self.progress.batches_in_epoch += k
        ok = self.optimizer_step()
        self.progress.step += 1
        return total if ok else torch.where(torch.isfinite(total), total, math.nan)

    def optimizer_step(self) -> bool:
        """Unscales, checks finiteness on every rank, clips, steps; False if the step is skipped.

        The skip, the stop request and every non-finite check (the backbone's gradient norm,
        the gradients of every optimizer, and the GradScaler's own inf check of each of them)
        travel in one device tensor, all-reduced once and read once: the step's only host
        synchronisation when nothing is logged.
        """
        cfg = self.cfg
        opts = [o for o, _ in self.optimizers]
        for opt in opts:
            self.scaler.unscale_(opt)
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        max_norm = cfg.optim.grad_clip_norm if cfg.optim.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else None
        self.last_grad_norm = grad_norm if grad_norm is not None else torch.zeros(())
        # [skip, stop, loss scale]: one read gives the decision and the scale a skip logs
        flags = torch.zeros(3, device=self.device)
        nonfinite = [
            non_finite_flag([p.grad for g in o.param_groups for p in g["params"]]) for o in opts
        ]
        if grad_norm is not None:
            nonfinite.append((~torch.isfinite(grad_norm)).float())
        if self.scaler.is_enabled():
            for opt in opts:
                # The scaler's own inf check (recorded by unscale_), whichever device it ran on.
                nonfinite += [f.float() for f in self.scaler._found_inf_per_device(opt).values()]
        for flag in nonfinite:
            if flag is not None:
                flags[0] = torch.maximum(flags[0], flag.to(self.device).reshape(()))
        if self.stop_signal is not None:
            flags[1] = 1.0
        if self.scaler.is_enabled():
            flags[2] = self.scaler._get_scale_async().to(self.device).reshape(())
        # One tiny all-reduce per step: every rank must agree to skip and to stop.
        all_reduce(flags, op="max")
        skip, stop, scale = flags.tolist()  # CPU-GPU sync point: the step's one host read
        self.stop_agreed = stop > 0
        if skip > 0:
            self._skip(opts, scale)
            return False
        self.skipped_in_row = 0
        # Every optimizer's gradients are unscaled and known finite on every rank: step them
        # directly (GradScaler.step would read each optimizer's inf flag back again).
        for opt in opts:
            opt.step()
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        return True

    def _skip(self, opts: list[torch.optim.Optimizer], scale: float) -> None:
        """Drops this step's gradients, backs the scaler off from ``scale`` (its value this
        step), counts; raises past the limit."""
        cfg = self.cfg
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        # A GradScaler overflow while the scale is still large is the scaler searching for
        # its range (normal in the first fp16 steps); only skips at a scale below 1, or
        # without a scaler, count towards max_skipped_steps.
        searching = self.scaler.is_enabled() and scale >= 1.0
        if self.scaler.is_enabled():
            # Back off explicitly: the overflow may have been seen on another rank only,
            # and every rank's scale must stay the same.
            scale *= self.scaler.get_backoff_factor()
            self.scaler.update(scale)
        self.skipped_total += 1
        if not searching:
            self.skipped_in_row += 1
        log.warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all%s)",
            self.progress.step + 1,
            self.skipped_in_row,
            self.skipped_total,
            f", loss scale now {scale:g}" if self.scaler.is_enabled() else "",
        )
        if self.skipped_in_row >= cfg.max_skipped_steps:
            raise RuntimeError(
                f"{self.skipped_in_row} consecutive non-finite steps (max_skipped_steps="
                f"{cfg.max_skipped_steps}); lower the learning rate or use bf16"
            )


def non_finite_flag(tensors: list[torch.Tensor | None]) -> torch.Tensor | None:
    """A 0-d float tensor, 1 if any of ``tensors`` holds a non-finite value, else 0; computed
    on the device (no host read). ``None`` entries are left out; ``None`` if none remain."""
    present = [t for t in tensors if t is not None]
    if not present:
        return None
    # max-norms: inf for an inf entry, NaN for a NaN, never an overflow of finite values
    flags = [
        (~torch.isfinite(torch.stack(torch._foreach_norm(group, ord=math.inf)))).any()
        for group in _by_device_and_dtype(present)
    ]
    return torch.stack([f.to(flags[0].device) for f in flags]).any().float()


def _by_device_and_dtype(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    groups: dict[tuple, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return list(groups.values())


def install_stop_handlers(request_stop: Callable[[int], None]) -> None:
    """SIGTERM / SIGUSR1 (SLURM preemption) call ``request_stop(signum)``: a checkpoint at the
    step every rank agrees on, then a clean exit."""

    def handler(signum, _frame):
        request_stop(signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        with contextlib.suppress(ValueError):  # not the main thread
            signal.signal(sig, handler)
