"""The training loop: builds every component from a :class:`TrainConfig` and runs it.

Owns: seeding, building (data, backbone + DDP, loss, optimizers, schedule, scaler), the step
(micro-steps with gradient accumulation, autocast, non-finite skipping), and the hooks (log line,
TensorBoard, evaluation, checkpoints, preemption signals). It does not own any maths: margins
live in ``heads/``, the sharded classifier in :mod:`dist_train.partial_fc`, metrics in ``eval/``.

Gradient scaling relative to DDP: every loss here is the *global-batch* mean, identical on all
ranks, and the gradient reaching each rank's local embeddings is exactly that loss's gradient
(see :mod:`dist_train.collectives`). DDP would average backbone gradients over ranks, i.e. divide
them by the world size; a comm hook makes it *sum* instead, so backbone gradients equal the
gradient a single process would compute on the whole global batch (pinned by a test).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import backbones
from dist_train import checkpoint as ckpt
from dist_train.config import TrainConfig, save_config, to_dict
from dist_train.distributed import DistInfo, all_gather_object, all_reduce, barrier
from dist_train.logging_utils import TensorBoard, format_eta, setup_logging
from dist_train.losses import build_loss
from dist_train.optim import LRSchedule, build_optimizer

log = logging.getLogger(__name__)

_LOGGED_METRICS = ("accuracy", "accuracy_std", "eer", "auc", "tar@far=1e-3", "best_f1")
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    """Seeds Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _allreduce_sum_hook(state, bucket):  # no annotations: DDP checks them as real types
    """DDP comm hook: sum gradients over ranks instead of averaging (see the module doc)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def _wrap_ddp(backbone: nn.Module, device: torch.device) -> DDP:
    """DDP over the backbone; BatchNorm running statistics stay rank-local (as InsightFace
    does) instead of being broadcast from rank 0 at every forward."""
    ids = [device.index] if device.type == "cuda" else None
    try:
        return DDP(backbone, device_ids=ids, forward_sync_buffers=False)
    except TypeError:  # torch releases before forward_sync_buffers
        return DDP(backbone, device_ids=ids, broadcast_buffers=False)


def rng_state() -> dict[str, Any]:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_backbone(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The backbone from config, initialised from a file and partly frozen if asked."""
    bcfg = cfg.backbone
    model = backbones.get_backbone(
        bcfg.name,
        embedding_size=bcfg.embedding_size,
        checkpointing=bcfg.checkpointing,
        **({"dropout": bcfg.dropout} if bcfg.dropout else {}),
        **bcfg.params,
    )
    if bcfg.init_weights:
        # strict: every key must fit (the error names the file and the keys that do not)
        backbones.load_weights(model, bcfg.init_weights)
        log.info("backbone initialised from %s", bcfg.init_weights)
    if bcfg.freeze_stages:
        stages = model.stages()
        if bcfg.freeze_stages > len(stages):
            raise ValueError(
                f"backbone.freeze_stages={bcfg.freeze_stages} but {bcfg.name} has "
                f"{len(stages)} stages (stem included)"
            )
        for stage in stages[: bcfg.freeze_stages]:
            for p in stage.parameters():
                p.requires_grad_(False)
    model.to(device)
    if bcfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return model


class Trainer:
    """Runs one training job; ``Trainer(cfg, dist_info).fit()``."""

    def __init__(self, cfg: TrainConfig, dist_info: DistInfo) -> None:
        from dist_train.data import build_train_data

        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.run_dir = Path(cfg.output_dir)
        setup_logging(self.run_dir, dist_info.is_main, dist_info.rank)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        # Same seed on every rank: identical initial backbones (DDP also broadcasts rank 0's).
        seed_everything(cfg.seed)
        self.data = build_train_data(cfg.data, dist_info, cfg.seed)
        self.num_classes = self.data.num_classes
        self.backbone = build_backbone(cfg, self.device)
        self.model: nn.Module = self.backbone
        if dist_info.is_distributed:
            self.model = _wrap_ddp(self.backbone, self.device)
            self.model.register_comm_hook(None, _allreduce_sum_hook)
        self.loss = build_loss(cfg, self.num_classes, self.device)
        self.optimizer = build_optimizer(cfg.optim, [self.backbone, self.loss.dense_module()])
        # Every optimizer the schedule drives: (optimizer, its base lr).
        self.optimizers: list[tuple[torch.optim.Optimizer, float]] = [
            (self.optimizer, cfg.optim.lr)
        ] + [(opt, cfg.optim.lr * scale) for opt, scale in self.loss.extra_optimizers()]
        self.steps_per_epoch = max(1, len(self.data.loader) // cfg.grad_accum_steps)
        if len(self.data.loader) < cfg.grad_accum_steps:
            raise ValueError(
                f"an epoch has {len(self.data.loader)} batches per rank, fewer than "
                f"grad_accum_steps={cfg.grad_accum_steps}"
            )
        self.total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * self.steps_per_epoch)
        self.schedule = LRSchedule(
            cfg.scheduler, cfg.optim.lr, self.total_steps, self.steps_per_epoch
        )
        self.amp_dtype = _AMP_DTYPES.get(cfg.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16")
        self.global_batch = cfg.data.batch_size * dist_info.world_size * cfg.grad_accum_steps
        self.step = 0
        self.epoch = 0
        self.batches_in_epoch = 0
        self.skipped_total = 0
        self.skipped_in_row = 0
        self.best: float | None = None
        self.last_metrics: dict[str, dict[str, float]] = {}
        self._stop_signal: int | None = None
        self._stop_agreed = False  # every rank saw a stop request (set by optimizer_step)
        self._saved_step = -1
        self._targets: list[Any] | None = None
        self.tb = TensorBoard(self.run_dir / "tensorboard", cfg.tensorboard and dist_info.is_main)
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

    # ---------------------------------------------------------------------------------------
    def fit(self) -> dict[str, dict[str, float]]:
        """Trains to ``total_steps``; returns the last evaluation's metrics."""
        self.maybe_resume()
        self._install_signal_handlers()
        if self.cfg.eval.at_start and self.step == 0:
            baseline = self.evaluate(tag="initial")
            if self.dist.is_main:
                with open(self.run_dir / "metrics_initial.json", "w") as f:
                    json.dump(baseline, f, indent=2)
        t_last, step_last = time.time(), self.step
        loss_sum, loss_count = 0.0, 0
        t_start, step_start = time.time(), self.step
        while self.step < self.total_steps:
            self.data.sampler.set_epoch(self.epoch)
            batches = iter(self.data.loader)
            while self.step < self.total_steps:
                # one optimizer step over grad_accum_steps micro-batches
                out = self.train_step(batches)
                if out is None:  # the epoch ran out of whole steps
                    break
                loss_sum += out
                loss_count += 1
                if self.maybe_log(loss_sum, loss_count, t_last, step_last, t_start, step_start):
                    t_last, step_last, loss_sum, loss_count = time.time(), self.step, 0.0, 0
                # evaluation every eval.every_steps
                if self.cfg.eval.every_steps and self.step % self.cfg.eval.every_steps == 0:
                    self.evaluate()
                # checkpoint every checkpoint.every_steps
                if self.cfg.checkpoint.every_steps and (
                    self.step % self.cfg.checkpoint.every_steps == 0
                ):
                    self.save_checkpoint()
                # preemption: checkpoint and leave
                if self._stop_agreed:
                    self.save_checkpoint()
                    log.warning("stopped by signal %s at step %d", self._stop_signal, self.step)
                    self.tb.close()
                    return self.last_metrics
            else:
                break
            self.epoch += 1
            self.batches_in_epoch = 0
            # end of an epoch: evaluate and/or checkpoint if configured
            if self.cfg.eval.every_epoch:
                self.evaluate()
            if self.cfg.checkpoint.at_epoch_end:
                self.save_checkpoint()
        self.finish()
        return self.last_metrics

    # ---------------------------------------------------------------------------------------
    def train_step(self, batches) -> float | None:
        """One optimizer step; returns the (unscaled) loss, or None at the end of the epoch."""
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
            self.schedule.apply(lr_opt, base, self.step)
        total = torch.zeros((), device=self.device)
        for i, (images, labels) in enumerate(micro):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            x = normalize_batch(images, cfg.data.mean, cfg.data.std)
            if cfg.backbone.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
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
                loss = self.loss(embeddings.float(), labels) / k
                self.scaler.scale(loss).backward()
            total += loss.detach()
        self.batches_in_epoch += k
        ok = self.optimizer_step()
        self.step += 1
        loss_value = float(total.item())  # CPU-GPU sync point: once per step, for logging
        if not ok:
            return loss_value if math.isfinite(loss_value) else float("nan")
        return loss_value

    def optimizer_step(self) -> bool:
        """Unscales, checks finiteness on every rank, clips, steps; False if the step is skipped."""
        cfg = self.cfg
        opts = [o for o, _ in self.optimizers]
        for opt in opts:
            self.scaler.unscale_(opt)
        params = [p for p in self.backbone.parameters() if p.grad is not None]
        max_norm = cfg.optim.grad_clip_norm if cfg.optim.grad_clip_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        self.last_grad_norm = grad_norm
        bad = torch.tensor(
            [0.0 if torch.isfinite(grad_norm) else 1.0, 0.0 if self._stop_signal is None else 1.0],
            device=self.device,
        )
        bad[0] += float(not self.loss.grads_finite())
        # One tiny all-reduce per step: every rank must agree to skip and to stop.
        all_reduce(bad, op="max")
        self._stop_agreed = bool(bad[1].item())
        if bad[0].item() > 0:
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            # A GradScaler overflow while the scale is still large is the scaler searching for
            # its range (normal in the first fp16 steps); only skips at a scale below 1, or
            # without a scaler, count towards max_skipped_steps.
            searching = self.scaler.is_enabled() and self.scaler.get_scale() >= 1.0
            if self.scaler.is_enabled():
                # Back off explicitly: the overflow may have been seen on another rank only,
                # and every rank's scale must stay the same.
                self.scaler.update(self.scaler.get_scale() * self.scaler.get_backoff_factor())
            self.skipped_total += 1
            if not searching:
                self.skipped_in_row += 1
            log.warning(
                "step %d: non-finite loss or gradient, step skipped (%d in a row, %d in all%s)",
                self.step + 1,
                self.skipped_in_row,
                self.skipped_total,
                f", loss scale now {self.scaler.get_scale():g}" if self.scaler.is_enabled() else "",
            )
            if self.skipped_in_row >= cfg.max_skipped_steps:
                raise RuntimeError(
                    f"{self.skipped_in_row} consecutive non-finite steps (max_skipped_steps="
                    f"{cfg.max_skipped_steps}); lower the learning rate or use bf16"
                )
            return False
        self.skipped_in_row = 0
        for opt in opts:
            self.scaler.step(opt)
        self.scaler.update()
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        return True

    # ---------------------------------------------------------------------------------------
    def maybe_log(self, loss_sum, loss_count, t_last, step_last, t_start, step_start) -> bool:
        """Log line and TensorBoard scalars every ``log_every_steps``; True when it logged."""
        cfg = self.cfg
        if not (self.step % cfg.log_every_steps == 0 or self.step == self.total_steps):
            return False
        now = time.time()
        sps = (self.step - step_last) * self.global_batch / max(1e-9, now - t_last)
        rate = (self.step - step_start) / max(1e-9, now - t_start)
        eta = (self.total_steps - self.step) / max(1e-9, rate)
        loss = loss_sum / max(1, loss_count)
        lr = self.optimizer.param_groups[0]["lr"]
        log.info(
            "step %d/%d epoch %d loss %.4f lr %.3g samples/s %.1f grad_norm %.3g eta %s",
            self.step,
            self.total_steps,
            self.epoch,
            loss,
            lr,
            sps,
            float(self.last_grad_norm),
            format_eta(eta),
        )
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/samples_per_s": sps,
            "train/grad_norm": float(self.last_grad_norm),
            "train/skipped_steps": float(self.skipped_total),
            "train/epoch": float(self.epoch),
        }
        if self.scaler.is_enabled():
            values["train/loss_scale"] = float(self.scaler.get_scale())
        self.tb.scalars(values, self.step)
        return True

    # ---------------------------------------------------------------------------------------
    def _evaluate_model(self, model: nn.Module, targets: list[Any]) -> dict[str, Any]:
        """``eval.runner.evaluate_targets_full`` with this run's eval and input settings
        (collective under a process group); the backbone is left in train mode."""
        from eval.runner import evaluate_targets_full

        ecfg = self.cfg.eval
        with torch.no_grad():
            full = evaluate_targets_full(
                model,
                targets,
                device=self.device,
                batch_size=ecfg.batch_size,
                flip=ecfg.flip,
                low_light=ecfg.low_light,
                mean=self.cfg.data.mean,
                std=self.cfg.data.std,
                amp=self.cfg.amp,
                image_size=self.cfg.data.image_size,
                center_crop=self.cfg.data.center_crop,
            )
        self.backbone.train()
        return full

    def evaluate(self, tag: str = "") -> dict[str, dict[str, float]]:
        """Evaluates every configured target (all ranks take part); rank 0 logs.

        TensorBoard gets every metric as a scalar and the ROC, precision-recall, score and
        angle histograms as images under ``eval/<target>/`` (``eval_<tag>/`` for a baseline).
        """
        ecfg = self.cfg.eval
        if not ecfg.targets:
            return {}
        from eval.report import log_tensorboard
        from eval.targets import load_target

        if self._targets is None:
            self._targets = [load_target(p) for p in ecfg.targets]
        if self.dist.is_distributed:
            # BatchNorm statistics stay rank-local in training, but each rank embeds a shard of
            # the images: use rank 0's everywhere, so the metrics are those of the weights rank
            # 0 saves (best_model.pt, model.pt).
            for buf in self.backbone.buffers():
                dist.broadcast(buf, 0)
        full = self._evaluate_model(self.backbone, self._targets)
        results = {name: dict(r.metrics) for name, r in full.items()}
        for name, m in results.items():
            shown = [k for k in _LOGGED_METRICS if k in m]
            text = " ".join(f"{k} {m[k]:.4f}" for k in shown)
            log.info("eval%s step %d %s: %s", f" ({tag})" if tag else "", self.step, name, text)
        if self.tb.writer is not None:
            log_tensorboard(
                self.tb.writer, full, self.step, prefix=f"eval_{tag}" if tag else "eval"
            )
            self.tb.flush()
        if not tag:
            self.last_metrics = results
            self._maybe_keep_best(results)
        return results

    def _maybe_keep_best(self, results: dict[str, dict[str, float]]) -> None:
        spec = self.cfg.eval.best_metric
        if not spec:
            return
        target, _, metric = spec.partition("/")
        if target not in results or metric not in results[target]:
            log.warning("eval.best_metric %s not among the evaluation results", spec)
            return
        value = results[target][metric]
        lower_is_better = metric in ("eer",) or metric.startswith("far")
        better = self.best is None or (value < self.best if lower_is_better else value > self.best)
        if better:
            self.best = value
            if self.dist.is_main:
                ckpt.atomic_save(self.backbone.state_dict(), self.run_dir / "best_model.pt")
                _write_best_info(self.run_dir, spec, value, self.step, self.epoch)
                log.info("new best %s = %.4f at step %d: best_model.pt", spec, value, self.step)

    # ---------------------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything but the sharded loss state (collective: every rank must call)."""
        return {
            "backbone": self.backbone.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self.data.sampler.state_dict(self.batches_in_epoch),
            "rng": all_gather_object(rng_state()),
            "step": self.step,
            "epoch": self.epoch,
            "batches_in_epoch": self.batches_in_epoch,
            "skipped_total": self.skipped_total,
            "best": self.best,
            "world_size": self.dist.world_size,
            "config": to_dict(self.cfg),
        }

    def save_checkpoint(self) -> Path:
        """Writes ``checkpoints/step_XXXXXXXX.pt`` and its loss shards, atomically.

        Every rank writes its piece of the sharded loss state (Partial FC rows and optimizer
        rows, tagged with their class ranges) to ``step_XXXXXXXX.shardRRR-of-WWW.pt``; rank 0
        writes the main file last, after a barrier, so a main file exists only when all its
        shards do. Any world size can load the set.
        """
        path = ckpt.checkpoint_path(self.run_dir, self.step)
        if self._saved_step == self.step:  # e.g. an epoch end that is also a save step
            return path
        local = self.loss.local_state()
        shard = ckpt.shard_path(path, self.dist.rank, self.dist.world_size)
        ckpt.atomic_save(local, shard)
        state = self.state()
        barrier()  # every shard is on disk before the main file names them
        if self.dist.is_main:
            state["loss_shards"] = [
                ckpt.shard_path(path, r, self.dist.world_size).name
                for r in range(self.dist.world_size)
            ]
            ckpt.atomic_save(state, path)
            ckpt.rotate(self.run_dir, self.cfg.checkpoint.keep_last)
            log.info("checkpoint %s", path)
        barrier()
        self._saved_step = self.step
        return path

    def maybe_resume(self) -> None:
        """Restores the newest valid checkpoint when ``checkpoint.resume`` asks for it."""
        found = ckpt.find_resume(self.run_dir, self.cfg.checkpoint.resume)
        if found is None:
            return
        path, state = found
        self.backbone.load_state_dict(state["backbone"])
        self.loss.load_pieces(ckpt.load_shards(path, state))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = int(state["step"]), int(state["epoch"])
        self.batches_in_epoch = int(state["batches_in_epoch"])
        self.skipped_total = int(state.get("skipped_total", 0))
        self.best = state.get("best")
        same_world = int(state["world_size"]) == self.dist.world_size
        sampler_state = dict(state["sampler"])
        mine = self.data.sampler.state_dict(0)
        if (sampler_state["world_size"], sampler_state["batch_size"]) != (
            mine["world_size"],
            mine["batch_size"],
        ):
            # The epoch's global order does not depend on the world size: continue after the
            # images already consumed, rounded down to a whole new global batch.
            consumed = (
                sampler_state["batches_consumed"]
                * sampler_state["batch_size"]
                * sampler_state["world_size"]
            )
            sampler_state.update(
                world_size=mine["world_size"],
                batch_size=mine["batch_size"],
                batches_consumed=consumed // (mine["world_size"] * mine["batch_size"]),
            )
            self.batches_in_epoch = sampler_state["batches_consumed"]
        self.data.sampler.load_state_dict(sampler_state)
        if same_world:
            set_rng_state(state["rng"][self.dist.rank])
        log.info(
            "resumed from %s at step %d (epoch %d, batch %d)%s",
            path,
            self.step,
            self.epoch,
            self.batches_in_epoch,
            "" if same_world else f" written by {state['world_size']} processes",
        )

    def finish(self) -> None:
        """Final evaluation, backbone weights file and full checkpoint."""
        self.evaluate()
        if self.dist.is_main:
            ckpt.atomic_save(self.backbone.state_dict(), self.run_dir / "model.pt")
            with open(self.run_dir / "metrics.json", "w") as f:
                json.dump(self.last_metrics, f, indent=2)
        path = self.save_checkpoint()
        if self.dist.is_main:
            flat = {f"{t}/{k}": v for t, m in self.last_metrics.items() for k, v in m.items()}
            hp = {
                "backbone": self.cfg.backbone.name,
                "head": self.cfg.head.name,
                "lr": self.cfg.optim.lr,
                "global_batch": self.global_batch,
                "sample_rate": self.cfg.partial_fc.sample_rate,
            }
            if flat:
                self.tb.hparams(hp, {f"hparam/{k}": v for k, v in flat.items()})
            log.info("weights %s, checkpoint %s", self.run_dir / "model.pt", path)
        self.evaluate_test()
        self.tb.close()

    def evaluate_test(self) -> dict[str, dict[str, float]]:
        """Scores ``eval.test_targets`` with the best weights (collective: all ranks call).

        Uses ``best_model.pt`` when ``eval.best_metric`` kept one, else the final ``model.pt``.
        Every rank loads the file (rank 0's weights and BatchNorm statistics, which stay
        rank-local in training) into a copy of the backbone, so the numbers are exactly those
        of the file. Rank 0 logs the results, adds them to TensorBoard under ``test/`` and
        writes ``metrics_test.json`` with the metrics, the weights used and, for a best
        checkpoint, the step/epoch and value that selected it.
        """
        ecfg = self.cfg.eval
        if not ecfg.test_targets:
            return {}
        import copy

        from eval.report import log_tensorboard
        from eval.targets import load_target

        barrier()  # rank 0 has finished writing best_model.pt / model.pt
        best_path = self.run_dir / "best_model.pt"
        path = self.run_dir / "model.pt"
        source: dict[str, Any] = {"weights": str(path), "step": self.step, "epoch": self.epoch}
        if ecfg.best_metric and best_path.is_file():
            path = best_path
            info_path = self.run_dir / "best_model.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            source = {"weights": str(best_path), **info}
        model = copy.deepcopy(self.backbone)
        model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        targets = [load_target(p) for p in ecfg.test_targets]
        full = self._evaluate_model(model, targets)
        results = {name: dict(r.metrics) for name, r in full.items()}
        if self.dist.is_main:
            for name, m in results.items():
                text = " ".join(f"{k} {m[k]:.4f}" for k in _LOGGED_METRICS if k in m)
                log.info("test (%s weights) %s: %s", source["weights"], name, text)
            with open(self.run_dir / "metrics_test.json", "w") as f:
                json.dump({"source": source, "metrics": results}, f, indent=2)
            if self.tb.writer is not None:
                log_tensorboard(self.tb.writer, full, self.step, prefix="test")
                self.tb.flush()
        return results

    # ---------------------------------------------------------------------------------------
    def _install_signal_handlers(self) -> None:
        """SIGTERM / SIGUSR1 (SLURM preemption) ask for a checkpoint and a clean exit."""

        def handler(signum, _frame):
            self._stop_signal = signum

        for sig in (signal.SIGTERM, signal.SIGUSR1):
            with contextlib.suppress(ValueError):  # not the main thread
                signal.signal(sig, handler)


def _write_best_info(run_dir: Path, spec: str, value: float, step: int, epoch: int) -> None:
    """``best_model.json``: which evaluation selected ``best_model.pt`` (read by the test eval)."""
    info = {"best_metric": spec, "value": value, "step": step, "epoch": epoch}
    tmp = run_dir / "best_model.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "best_model.json")


def normalize_batch(images: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """uint8 ``[B,3,H,W]`` -> float32 ``(x/255 - mean)/std`` on the images' device."""
    return images.float().div_(255.0).sub_(mean).div_(std)
