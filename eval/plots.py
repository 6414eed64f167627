"""Verification plots drawn with matplotlib: ROC (log FAR), precision–recall, score histograms.

Owns turning curves and score arrays into RGB images (``[H, W, 3]`` uint8, ready for
``SummaryWriter.add_image(..., dataformats="HWC")``) and PNG files. Figures are drawn on
matplotlib's Agg canvas through :class:`matplotlib.figure.Figure` (no pyplot, no global state, no
display needed), with fixed pixel margins so every figure of a size has the same plot box. It
computes no metrics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

#: Colours (RGB) of successive series.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]
_GRID = (225 / 255,) * 3
_DPI = 100
#: Plot-box margins in pixels: left (tick labels and y label), right, top (title), bottom.
_MARGINS = (72, 18, 36, 52)
_LINE_WIDTH = 2.0  # points: about 3 pixels at 100 dpi
_FONT = 9


@dataclass
class Series:
    """One curve or histogram.

    Attributes:
        x, y: ``[K]`` coordinates; for ``kind="hist"`` ``x`` holds ``K + 1`` bin edges.
        label: legend text.
        kind: ``"line"`` or ``"hist"`` (translucent filled bars under a step outline).
    """

    x: np.ndarray
    y: np.ndarray
    label: str = ""
    kind: str = "line"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """About ``target`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) in
    ``[lo, hi]``."""
    if hi <= lo:
        return [lo]
    values = MaxNLocator(nbins=target, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi)
    eps = 1e-9 * (hi - lo)
    return [0.0 if abs(v) < eps else float(v) for v in values if lo - eps <= v <= hi + eps]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


def decade(v: float) -> str:
    """Label of a power of ten on a log axis: ``1e-3``, ``10``, ``1``."""
    k = int(round(math.log10(v)))
    return {0: "1", 1: "10"}.get(k, f"1e{k}")


def _rgb(colour: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in colour)


def render(
    series: list[Series],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    xlog: bool = False,
    xlim: tuple[float, float] | None = None,
    ylim: tuple[float, float] | None = None,
    size: tuple[int, int] = (640, 480),
    legend: str = "lower right",
) -> np.ndarray:
    """Draws ``series`` on one set of axes.

    Args:
        series: curves and/or histograms.
        title, xlabel, ylabel: texts.
        xlog: logarithmic x axis (non-positive x values are clipped to the lower limit).
        xlim, ylim: axis ranges (default: the data's range).
        size: ``(width, height)`` in pixels.
        legend: a matplotlib legend location (``"lower right"``, ``"upper left"``, ...).

    Returns:
        ``[H, W, 3]`` uint8 RGB image.
    """
    width, height = size
    xs = np.concatenate([np.asarray(s.x, float).ravel() for s in series]) if series else [0, 1]
    ys = np.concatenate([np.asarray(s.y, float).ravel() for s in series]) if series else [0, 1]
    if xlim is None:
        xv = xs[xs > 0] if xlog else xs
        xlim = (float(np.min(xv)), float(np.max(xv))) if len(xv) else (1e-4, 1.0)
    if ylim is None:
        ylim = (min(0.0, float(np.min(ys))), float(np.max(ys)) * 1.05 or 1.0)
    if xlim[1] <= xlim[0]:
        xlim = (xlim[0], xlim[0] * 10 if xlog else xlim[0] + 1.0)
    y0, y1 = ylim if ylim[1] > ylim[0] else (ylim[0], ylim[0] + 1.0)

    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI)
    canvas = FigureCanvasAgg(fig)
    left, right, top, bottom = _MARGINS
    box_w, box_h = (width - left - right) / width, (height - top - bottom) / height
    ax = fig.add_axes((left / width, bottom / height, box_w, box_h))
    for i, s in enumerate(series):
        colour = _rgb(PALETTE[i % len(PALETTE)])
        label = s.label or None
        if s.kind == "hist":
            ax.stairs(s.y, s.x, baseline=y0, fill=True, color=colour, alpha=0.45, linewidth=0)
            ax.stairs(s.y, s.x, baseline=None, color=colour, linewidth=_LINE_WIDTH, label=label)
        else:
            x = np.clip(np.asarray(s.x, float), xlim[0], None) if xlog else s.x
            ax.plot(x, s.y, color=colour, linewidth=_LINE_WIDTH, label=label)

    if xlog:
        ax.set_xscale("log")
        lo, hi = math.ceil(math.log10(xlim[0]) - 1e-9), math.floor(math.log10(xlim[1]) + 1e-9)
        ax.xaxis.set_major_locator(FixedLocator([10.0**k for k in range(lo, hi + 1)]))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: decade(v)))
        ax.xaxis.set_minor_locator(NullLocator())
    else:
        ax.xaxis.set_major_locator(FixedLocator(nice_ticks(*xlim)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
    ax.yaxis.set_major_locator(FixedLocator(nice_ticks(y0, y1)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(v)))
    ax.set_xlim(*xlim)
    ax.set_ylim(y0, y1)
    ax.tick_params(labelsize=_FONT)
    ax.grid(True, color=_GRID, linewidth=1)
    ax.set_axisbelow(True)
    ax.set_title(title, fontsize=_FONT + 2)
    ax.set_xlabel(xlabel, fontsize=_FONT)
    ax.set_ylabel(ylabel, fontsize=_FONT)
    if any(s.label for s in series):
        ax.legend(loc=legend, fontsize=_FONT, edgecolor=(160 / 255,) * 3, fancybox=False)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# --------------------------------------------------------------------------------------------
# Verification figures
# --------------------------------------------------------------------------------------------


def roc_figure(fpr: np.ndarray, tpr: np.ndarray, title: str = "ROC") -> np.ndarray:
    """TAR against FAR with a logarithmic FAR axis down to the smallest non-zero FAR."""
    pos = fpr[fpr > 0]
    lo = min(10 ** math.floor(math.log10(pos.min())), 0.1) if pos.size else 1e-4
    return render(
        [Series(np.clip(fpr, lo, 1), tpr, "ROC")],
        title=title,
        xlabel="false accept rate (FAR)",
        ylabel="true accept rate (TAR)",
        xlog=True,
        xlim=(lo, 1.0),
        ylim=(0.0, 1.0),
    )


def pr_figure(precision: np.ndarray, recall: np.ndarray, title: str = "Precision-recall"):
    """Precision against recall, genuine pairs as positives."""
    return render(
        [Series(recall, precision, "precision-recall")],
        title=title,
        xlabel="recall",
        ylabel="precision",
        xlim=(0.0, 1.0),
        ylim=(0.0, 1.0),
        legend="lower left",
    )


def _hist_pair(genuine: np.ndarray, impostor: np.ndarray, bins: int, lo: float, hi: float):
    edges = np.linspace(lo, hi, bins + 1)
    g = np.histogram(genuine, bins=edges)[0] / max(len(genuine), 1)
    i = np.histogram(impostor, bins=edges)[0] / max(len(impostor), 1)
    return [
        Series(edges, g, f"genuine ({len(genuine)})", "hist"),
        Series(edges, i, f"impostor ({len(impostor)})", "hist"),
    ]


def score_histogram_figure(
    scores: np.ndarray, issame: np.ndarray, title: str = "Cosine similarity", bins: int = 60
) -> np.ndarray:
    """Genuine and impostor cosine-similarity histograms (fractions of each group)."""
    series = _hist_pair(scores[issame], scores[~issame], bins, -1.0, 1.0)
    return render(
        series,
        title=title,
        xlabel="cosine similarity",
        ylabel="fraction of pairs",
        xlim=(-1.0, 1.0),
        legend="upper left",
    )


def angle_histogram_figure(
    scores: np.ndarray, issame: np.ndarray, title: str = "Pair angles", bins: int = 60
) -> np.ndarray:
    """Histograms of the angle (degrees) between the two embeddings of genuine / impostor pairs."""
    angles = np.degrees(np.arccos(np.clip(scores, -1.0, 1.0)))
    series = _hist_pair(angles[issame], angles[~issame], bins, 0.0, 180.0)
    return render(
        series,
        title=title,
        xlabel="angle between embeddings (degrees)",
        ylabel="fraction of pairs",
        xlim=(0.0, 180.0),
        legend="upper right",
    )


def verification_figures(
    name: str, scores: np.ndarray, issame: np.ndarray, curves: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The four figures of a labelled target: ``{"roc", "pr", "scores", "angles"} -> RGB``.

    Args:
        name: target name (in titles).
        scores: ``[P]`` cosine similarities.
        issame: ``[P]`` bool.
        curves: ``fpr``, ``tpr``, ``precision``, ``recall`` arrays (``TargetResult.curves()``).
    """
    return {
        "roc": roc_figure(curves["fpr"], curves["tpr"], f"{name}: ROC"),
        "pr": pr_figure(curves["precision"], curves["recall"], f"{name}: precision-recall"),
        "scores": score_histogram_figure(scores, issame, f"{name}: genuine vs impostor scores"),
        "angles": angle_histogram_figure(scores, issame, f"{name}: pair angles"),
    }


def save_png(path: str, image: np.ndarray) -> None:
    """Writes an RGB image as PNG (creating the directory)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if not cv2.imwrite(path, cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{path}: cannot write PNG")
