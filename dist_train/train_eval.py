"""Evaluation during training: periodic, epoch-end and final evaluation, the best model, and
the test evaluation of the best weights.

Owns: when the training run evaluates (``eval.at_start``, ``eval.every_steps``, the end of the
run; the trainer asks at epoch ends), the log lines and TensorBoard entries of the results,
``metrics_initial.json``, ``metrics.json``, ``model.pt`` (the final weights), best-model keeping
(``best_model.pt`` and ``best_model.json`` by ``eval.best_metric``) and the test evaluation
(``metrics_test.json``). Does not own the metrics, targets or embedding (``eval/``: this module
calls :func:`eval.runner.evaluate_targets_full` from one place, :meth:`TrainEvaluator._evaluate`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from dist_train import checkpoint as ckpt
from dist_train.config import TrainConfig
from dist_train.distributed import DistInfo, barrier
from dist_train.logging_utils import TensorBoard
from dist_train.model_setup import cpu_state_dict

if TYPE_CHECKING:
    from dist_train.train_step import Progress

log = logging.getLogger(__name__)

LOGGED_METRICS = ("accuracy", "accuracy_std", "eer", "auc", "tar@far=1e-3", "best_f1")
"""The metrics a log line shows (every metric goes to the JSON files and TensorBoard)."""

Results = dict[str, dict[str, float]]
"""``target name -> metric -> value``."""


class TrainEvaluator:
    """Evaluates the training backbone on ``eval.targets`` and the best weights on
    ``eval.test_targets``; every rank must call every method (evaluation is collective under a
    process group), rank 0 logs and writes.

    Args:
        cfg: the run's config (``eval`` and the input settings of ``data``).
        dist_info: this process's place in the job.
        backbone: the bare training backbone (not its DDP wrapper).
        tb: the run's TensorBoard writer.
        progress: the run's position (step and epoch of each result).

    Attributes:
        last_metrics: the latest untagged evaluation's results.
        best: the best value of ``eval.best_metric`` so far (checkpointed).
        on_evaluate: called with ``(tag, results)`` after every :meth:`evaluate`
            (``Trainer.fit(on_evaluate=...)`` sets it).
    """

    def __init__(
        self,
        cfg: TrainConfig,
        dist_info: DistInfo,
        backbone: nn.Module,
        tb: TensorBoard,
        progress: Progress,
    ) -> None:
        self.cfg = cfg
        self.dist = dist_info
        self.device = dist_info.device
        self.backbone = backbone
        self.tb = tb
        self.progress = progress
        self.run_dir = Path(cfg.output_dir)
        self.last_metrics: Results = {}
        self.best: float | None = None
        self.on_evaluate: Callable[[str, Results], None] | None = None
        self._targets: list[Any] | None = None

    # ---------------------------------------------------------------------------------------
    def maybe_evaluate_initial(self) -> None:
        """The baseline before training (``eval.at_start``, fresh runs only):
        ``metrics_initial.json`` and TensorBoard under ``eval_initial/``."""
        if self.cfg.eval.at_start and self.progress.step == 0:
            baseline = self.evaluate(tag="initial")
            if self.dist.is_main:
                with open(self.run_dir / "metrics_initial.json", "w") as f:
                    json.dump(baseline, f, indent=2)

    def maybe_evaluate(self) -> None:
        """Evaluates every ``eval.every_steps`` steps."""
        every = self.cfg.eval.every_steps
        if every and self.progress.step % every == 0:
            self.evaluate()

    def evaluate_epoch_end(self) -> None:
        """The end of an epoch (:attr:`progress` already counts it): ``eval.every_epoch``, and
        the IJB targets every ``eval.ijb_every_epochs`` epochs."""
        every_ijb = self.cfg.eval.ijb_every_epochs
        with_ijb = bool(every_ijb) and self.progress.epoch % every_ijb == 0
        if self.cfg.eval.every_epoch or (with_ijb and self._has_ijb()):
            self.evaluate(with_ijb=with_ijb)

    def evaluate_final(self) -> None:
        """The end of the run: evaluates (IJB targets included), then rank 0 writes the weights
        ``model.pt`` and the results ``metrics.json``."""
        self.evaluate(with_ijb=True)
        if self.dist.is_main:
            ckpt.atomic_save(cpu_state_dict(self.backbone), self.run_dir / "model.pt")
            with open(self.run_dir / "metrics.json", "w") as f:
                json.dump(self.last_metrics, f, indent=2)

    def evaluate(self, tag: str = "", *, with_ijb: bool = False) -> Results:
        """Evaluates every configured target (all ranks take part); rank 0 logs.

        TensorBoard gets every metric as a scalar and the ROC, precision-recall, score and
        angle histograms as images under ``eval/<target>/`` (``eval_<tag>/`` for a baseline).
        With two or more of the standard five sets (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW) among
        the targets, their mean (``eval.report.standard_mean``) is logged too, as the results'
        ``mean`` entry and the scalars ``eval/mean/<metric>``.
        IJB folders among the targets take part only ``with_ijb`` (see ``eval.ijb_every_epochs``).
        An untagged evaluation becomes :attr:`last_metrics` and may keep a new best model.
        """
        results = self._evaluate_targets(tag, with_ijb) if self.cfg.eval.targets else {}
        if self.on_evaluate is not None:
            self.on_evaluate(tag, results)
        return results

    def _has_ijb(self) -> bool:
        from eval.ijb import is_ijb_spec

        return any(is_ijb_spec(p) for p in self.cfg.eval.targets)

    def _evaluate_targets(self, tag: str, with_ijb: bool) -> Results:
        from eval.ijb import IJBMeta
        from eval.report import log_tensorboard
        from eval.runner import load_eval_target

        if self._targets is None:
            self._targets = [load_eval_target(p) for p in self.cfg.eval.targets]
        targets = [t for t in self._targets if with_ijb or not isinstance(t, IJBMeta)]
        if not targets:
            return {}
        if self.dist.is_distributed:
            # BatchNorm statistics stay rank-local in training, but each rank embeds a shard of
            # the images: use rank 0's everywhere, so the metrics are those of the weights rank
            # 0 saves (best_model.pt, model.pt).
            for buf in self.backbone.buffers():
                dist.broadcast(buf, 0)
        full = self._evaluate(self.backbone, targets)
        results = {name: dict(r.metrics) for name, r in full.items()}
        step = self.progress.step
        _log_results(f"eval{f' ({tag})' if tag else ''} step {step}", results, _add_mean(results))
        if self.tb.writer is not None:
            log_tensorboard(self.tb.writer, full, step, prefix=f"eval_{tag}" if tag else "eval")
            self.tb.flush()
        if not tag:
            self.last_metrics = results
            self._maybe_keep_best(results)
        return results

    def _maybe_keep_best(self, results: Results) -> None:
        """``best_model.pt`` and ``best_model.json`` when ``eval.best_metric`` improved."""
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
                step, epoch = self.progress.step, self.progress.epoch
                ckpt.atomic_save(cpu_state_dict(self.backbone), self.run_dir / "best_model.pt")
                _write_best_info(self.run_dir, spec, value, step, epoch)
                log.info("new best %s = %.4f at step %d: best_model.pt", spec, value, step)

    # ---------------------------------------------------------------------------------------
    def evaluate_test(self) -> Results:
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
        from eval.report import log_tensorboard
        from eval.runner import load_eval_target

        barrier()  # rank 0 has finished writing best_model.pt / model.pt
        best_path = self.run_dir / "best_model.pt"
        path = self.run_dir / "model.pt"
        source: dict[str, Any] = {
            "weights": str(path),
            "step": self.progress.step,
            "epoch": self.progress.epoch,
        }
        if ecfg.best_metric and best_path.is_file():
            path = best_path
            info_path = self.run_dir / "best_model.json"
            info = json.loads(info_path.read_text()) if info_path.is_file() else {}
            source = {"weights": str(best_path), **info}
        model = copy.deepcopy(self.backbone)
        model.load_state_dict(torch.load(path, map_location=self.device, weights_only=True))
        targets = [load_eval_target(p) for p in ecfg.test_targets]
        full = self._evaluate(model, targets)
        results = {name: dict(r.metrics) for name, r in full.items()}
        note = _add_mean(results)
        if self.dist.is_main:
            _log_results(f"test ({source['weights']} weights)", results, note)
            with open(self.run_dir / "metrics_test.json", "w") as f:
                json.dump({"source": source, "metrics": results}, f, indent=2)
            if self.tb.writer is not None:
                log_tensorboard(self.tb.writer, full, self.progress.step, prefix="test")
                self.tb.flush()
        return results

    # ---------------------------------------------------------------------------------------
    def _evaluate(self, model: nn.Module, targets: list[Any]) -> dict[str, Any]:
        """``eval.runner.evaluate_targets_full`` with this run's eval and input settings
        (collective under a process group); the backbone is left in train mode."""
        from eval.options import EvalOptions
        from eval.runner import evaluate_targets_full

        options = EvalOptions.from_train_config(self.cfg)
        with torch.no_grad():
            full = evaluate_targets_full(model, targets, options, device=self.device)
        self.backbone.train()
        return full


def _add_mean(results: Results) -> str:
    """With two or more of the standard five sets among ``results``, adds their mean
    (``eval.report.standard_mean``) as the pseudo-target ``mean`` (so ``eval.best_metric`` may
    be ``mean/accuracy``); returns the note naming the sets it averages ('' without one)."""
    from eval.report import mean_note, standard_mean

    mean = standard_mean(results)
    if mean is None or "mean" in results:
        return ""
    results["mean"] = dict(mean["metrics"])
    return mean_note(mean)


def _log_results(what: str, results: Results, mean_text: str) -> None:
    """One log line per target (the ``mean`` entry named by ``mean_text``)."""
    for name, m in results.items():
        text = " ".join(f"{k} {m[k]:.4f}" for k in LOGGED_METRICS if k in m)
        log.info("%s %s: %s", what, mean_text if name == "mean" and mean_text else name, text)


def _write_best_info(run_dir: Path, spec: str, value: float, step: int, epoch: int) -> None:
    """``best_model.json``: which evaluation selected ``best_model.pt`` (read by the test eval)."""
    info = {"best_metric": spec, "value": value, "step": step, "epoch": epoch}
    tmp = run_dir / "best_model.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, run_dir / "best_model.json")
