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
from eval.targets import STANDARD_SETS

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
    if key is None:  # the accuracy column shows mean ± std (a mean row: the mean only)
        if "accuracy" not in metrics:
            return "-"
        if "accuracy_std" not in metrics:
            return f"{metrics['accuracy']:.4f}"
        return f"{metrics['accuracy']:.4f} ± {metrics['accuracy_std']:.4f}"
    value = metrics.get(key)
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return fmt.format(value)


MEAN_METRICS = (
    "accuracy",
    "eer",
    "auc",
    "tar@far=1e-1",
    "tar@far=1e-2",
    "tar@far=1e-3",
    "tar@far=1e-4",
    "best_f1",
)
"""The metrics the ``mean`` row averages over the standard sets."""


def standard_mean(results: Mapping[str, Mapping[str, float]]) -> dict[str, Any] | None:
    """The papers' summary: each metric averaged over the standard five sets present.

    The five are :data:`eval.targets.STANDARD_SETS` (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW),
    matched by target name; other targets (``cfp_ff``, ``vgg2_fp``, pair lists) are not
    averaged. A metric is NaN when it is NaN on one of the sets.

    Args:
        results: ``target -> metric -> value``.

    Returns:
        ``{"sets": [...], "missing": [...], "label": str, "metrics": {metric: mean}}``, or
        None when fewer than two of the five were evaluated (a mean of one set says nothing).
    """
    sets = [n for n in STANDARD_SETS if n in results and "accuracy" in results[n]]
    if len(sets) < 2:
        return None
    missing = [n for n in STANDARD_SETS if n not in sets]
    means = {
        k: float(np.mean([results[n][k] for n in sets]))
        for k in MEAN_METRICS
        if all(k in results[n] for n in sets)
    }
    means["num_sets"] = float(len(sets))
    label = "mean" if not missing else f"mean ({len(sets)} of {len(STANDARD_SETS)})"
    return {"sets": sets, "missing": missing, "label": label, "metrics": means}


def mean_note(mean: Mapping[str, Any]) -> str:
    """One line saying which sets a :func:`standard_mean` row averages."""
    text = f"{mean['label']}: average over {', '.join(mean['sets'])}"
    if mean["missing"]:
        return f"{text}; not evaluated: {', '.join(mean['missing'])}"
    return f"{text} (the standard five)"


def _grid(
    first: str,
    columns: list,
    results: Mapping[str, Mapping[str, float]],
    footer: Mapping[str, Mapping[str, float]] | None = None,
) -> list[str]:
    """Fixed-width lines: a header, a rule, one row per target, then (after another rule) one
    row per ``footer`` entry (e.g. the mean over the standard sets)."""
    footer = footer or {}
    header = [first] + [c[0] for c in columns]
    rows = [[name] + [_cell(m, k, f) for _, k, f in columns] for name, m in results.items()]
    tail = [[name] + [_cell(m, k, f) for _, k, f in columns] for name, m in footer.items()]
    widths = [max(len(r[i]) for r in [header, *rows, *tail]) for i in range(len(header))]
    rule = "  ".join("-" * w for w in widths)
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), rule]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    if tail:
        lines.append(rule)
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in tail]
    return lines


def format_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """A fixed-width results table, one row per target, then the mean over the standard sets.

    The ``mean`` row (:func:`standard_mean`) appears when at least two of LFW, CFP-FP,
    AgeDB-30, CALFW and CPLFW are among the targets; a note under the table names the sets
    it averages and those missing.

    Args:
        results: ``target -> metric -> value`` (as returned by ``evaluate_targets``).
    """
    mean = standard_mean(results)
    footer = {mean["label"]: mean["metrics"]} if mean is not None else None
    lines = _grid("target", _COLUMNS, results, footer)
    notes = [mean_note(mean)] if mean is not None else []
    notes += [
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
    """Writes ``{"meta": ..., "targets": {name: result_dict}}`` (NaN written as null), and
    ``"mean": {"sets", "missing", "label", "metrics"}`` (:func:`standard_mean`) when at least
    two of the standard five sets are among the targets."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    doc = {
        "meta": _clean(dict(meta or {})),
        "targets": {n: result_dict(r) for n, r in results.items()},
    }
    mean = standard_mean({n: r.metrics for n, r in results.items()})
    if mean is not None:
        doc["mean"] = _clean(mean)
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
    """Scalars ``<prefix>/<target>/<metric>`` and, optionally, the figures as images; with at
    least two of the standard five sets, also ``<prefix>/mean/<metric>`` (:func:`standard_mean`).

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
    mean = standard_mean({n: r.metrics for n, r in results.items()})
    for key, value in (mean or {}).get("metrics", {}).items():
        if not math.isnan(value):
            writer.add_scalar(f"{prefix}/mean/{key}", value, step)
