"""Reports of evaluation results: console table, JSON, PNG figures, TensorBoard.

Owns presenting :class:`eval.runner.TargetResult` objects. It computes no metrics and loads
no models; the TensorBoard helper takes any object with ``add_scalar`` / ``add_image`` (a
``torch.utils.tensorboard.SummaryWriter``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from eval import plots
from eval.metrics import far_label
from eval.runner import TargetResult

_COLUMNS = [
    ("pairs", "num_pairs", "{:.0f}"),
    ("accuracy", None, None),
    ("EER", "eer", "{:.4f}"),
    ("AUC", "auc", "{:.4f}"),
    ("TAR@1e-1", "tar@far=1e-1", "{:.4f}"),
    ("TAR@1e-2", "tar@far=1e-2", "{:.4f}"),
    ("TAR@1e-3", "tar@far=1e-3", "{:.4f}"),
    ("TAR@1e-4", "tar@far=1e-4", "{:.4f}"),
    ("best F1", "best_f1", "{:.4f}"),
    ("XNorm", "xnorm", "{:.2f}"),
]


def _cell(metrics: Mapping[str, float], key: str | None, fmt: str | None) -> str:
    if key is None:  # the accuracy column shows mean ± std
        if "accuracy" not in metrics:
            return "-"
        return f"{metrics['accuracy']:.4f} ± {metrics['accuracy_std']:.4f}"
    value = metrics.get(key)
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return fmt.format(value)


def _grid(first: str, columns: list, results: Mapping[str, Mapping[str, float]]) -> list[str]:
    """Fixed-width lines: a header, a rule, one row per target."""
    header = [first] + [c[0] for c in columns]
    rows = [[name] + [_cell(m, k, f) for _, k, f in columns] for name, m in results.items()]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    return lines + ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width results table, one row per target.

    Args:
        results: ``target -> metric -> value`` (as returned by ``evaluate_targets``).
    """
    lines = _grid("target", _COLUMNS, results)
    notes = [
        f"n/a: TAR at FAR {far_label(float(k.split('=')[1]))} needs at least "
        f"{int(round(1 / float(k.split('=')[1])))} impostor pairs"
        for k in sorted(
            {
                k
                for m in results.values()
                for k, v in m.items()
                if k.startswith("tar@") and isinstance(v, float) and math.isnan(v)
            }
        )
    ]
    return "\n".join(lines + notes)


_IJB_COLUMNS = (
    [("templates", "num_templates", "{:.0f}"), ("pairs", "num_pairs", "{:.0f}")]
    + [(f"TAR@{f}", f"tar@far={f}", "{:.4f}") for f in ("1e-6", "1e-5", "1e-4", "1e-3", "1e-2")]
    + [("AUC", "auc", "{:.4f}")]
    + [(f"rank{k}", f"rank{k}", "{:.4f}") for k in (1, 5, 10)]
    + [(f"TPIR@{f}", f"tpir@fpir={f}", "{:.4f}") for f in ("1e-4", "1e-3", "1e-2", "1e-1")]
)


def format_ijb_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """The IJB table as papers print it: TAR at FAR 1e-6 ... 1e-2, AUC, rank-1/5/10 and TPIR
    at FPIR 1e-4 ... 1e-1 (``-`` where 1:N was not run), one row per IJB target."""
    return "\n".join(_grid("IJB", _IJB_COLUMNS, results))


def _clean(value: Any) -> Any:
    """JSON-safe value: NaN -> None, numpy scalars/arrays -> Python."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def result_dict(result: TargetResult) -> dict[str, Any]:
    """JSON-ready details of one target: metrics, fold thresholds, TAR@FAR points, best F1."""
    out: dict[str, Any] = {"metrics": dict(result.metrics)}
    if result.target is not None:
        out["path"] = result.target.path
    if result.kfold is not None:
        out["folds"] = {
            "accuracies": result.kfold.fold_accuracies,
            "thresholds": result.kfold.fold_thresholds,
        }
    if result.tar_at_far:
        out["tar_at_far"] = [
            {
                "far": p.far,
                "tar": p.tar,
                "threshold": p.threshold,
                "achieved_far": p.achieved_far,
                "num_impostors": p.num_impostors,
                "num_false_accepts": p.num_false_accepts,
            }
            for p in result.tar_at_far
        ]
    out.update(result.details)
    if result.best_f1 is not None:
        b = result.best_f1
        out["best_f1"] = {
            "f1": b.f1,
            "threshold": b.threshold,
            "precision": b.precision,
            "recall": b.recall,
        }
    return _clean(out)


def write_json(
    path: str, results: Mapping[str, TargetResult], meta: Mapping[str, Any] | None = None
) -> None:
    """Writes ``{"meta": ..., "targets": {name: result_dict}}`` (NaN written as null)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {
        "meta": _clean(dict(meta or {})),
        "targets": {n: result_dict(r) for n, r in results.items()},
    }
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, allow_nan=False)
        f.write("\n")


def figures(result: TargetResult) -> dict[str, np.ndarray]:
    """RGB figures (``roc``, ``pr``, ``scores``, ``angles``) of a labelled target, else ``{}``."""
    if result.issame is None:
        return {}
    return plots.verification_figures(result.name, result.scores, result.issame, result.curves())


def write_figures(out_dir: str, results: Mapping[str, TargetResult]) -> list[str]:
    """Writes ``<out_dir>/<target>_<figure>.png`` for every labelled target; returns the paths."""
    paths = []
    for name, result in results.items():
        for kind, image in figures(result).items():
            path = os.path.join(out_dir, f"{name}_{kind}.png")
            plots.save_png(path, image)
            paths.append(path)
    return paths


def log_tensorboard(
    writer: Any,
    results: Mapping[str, TargetResult],
    step: int,
    prefix: str = "eval",
    images: bool = True,
) -> None:
    """Scalars ``<prefix>/<target>/<metric>`` and, optionally, the figures as images.

    Args:
        writer: a ``SummaryWriter`` (anything with ``add_scalar`` and ``add_image``).
        results: output of ``evaluate_targets_full``.
        step: global step.
        prefix: tag prefix.
        images: also log the ROC / PR / histogram figures.
    """
    for name, result in results.items():
        for key, value in result.metrics.items():
            if not (isinstance(value, float) and math.isnan(value)):
                writer.add_scalar(f"{prefix}/{name}/{key}", value, step)
        if images:
            for kind, image in figures(result).items():
                writer.add_image(f"{prefix}/{name}/{kind}", image, step, dataformats="HWC")
