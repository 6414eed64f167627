"""Verification plots rendered with OpenCV: ROC (log FAR), precision–recall, score histograms.

Owns turning curves and score arrays into RGB images (``[H, W, 3]`` uint8, ready for
``SummaryWriter.add_image(..., dataformats="HWC")``) and PNG files. OpenCV is already a
dependency, so no plotting library is needed; the renderer draws axes with "nice" ticks, an
optional logarithmic x axis, labels, a title and a legend. It computes no metrics.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import cv2
import numpy as np

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_BLACK = (0, 0, 0)
_GRID = (225, 225, 225)
#: Colours (RGB) of successive series.
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189)]


@dataclass
class Series:
    """One curve or histogram.

    Attributes:
        x, y: ``[K]`` coordinates; for ``kind="hist"`` ``x`` holds ``K + 1`` bin edges.
        label: legend text.
        kind: ``"line"`` or ``"hist"`` (translucent filled bars).
    """

    x: np.ndarray
    y: np.ndarray
    label: str = ""
    kind: str = "line"


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    span = hi - lo
    if span <= 0:
        return [lo]
    raw = span / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    v = first
    while v <= hi + 1e-9 * span:
        ticks.append(0.0 if abs(v) < 1e-12 * step else v)
        v += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-2:
        return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:g}"


def _decade(v: float) -> str:
    k = int(round(math.log10(v)))
    return {0: "1", 1: "10"}.get(k, f"1e{k}")


def _text(img: np.ndarray, s: str, org: tuple[int, int], scale=0.45, anchor="left", thick=1):
    (w, h), _ = cv2.getTextSize(s, _FONT, scale, thick)
    x, y = org
    if anchor == "center":
        x -= w // 2
    elif anchor == "right":
        x -= w
    cv2.putText(img, s, (int(x), int(y + h // 2)), _FONT, scale, _BLACK, thick, cv2.LINE_AA)


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
        legend: ``"lower right"``, ``"upper right"`` or ``"upper left"``.

    Returns:
        ``[H, W, 3]`` uint8 RGB image.
    """
    width, height = size
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 72, 18, 36, 52
    pw, ph = width - left - right, height - top - bottom

    xs = np.concatenate([np.asarray(s.x, float).ravel() for s in series]) if series else [0, 1]
    ys = np.concatenate([np.asarray(s.y, float).ravel() for s in series]) if series else [0, 1]
    if xlim is None:
        xv = xs[xs > 0] if xlog else xs
        xlim = (float(np.min(xv)), float(np.max(xv))) if len(xv) else (1e-4, 1.0)
    if ylim is None:
        ylim = (min(0.0, float(np.min(ys))), float(np.max(ys)) * 1.05 or 1.0)
    x0, x1 = (math.log10(xlim[0]), math.log10(xlim[1])) if xlog else xlim
    if x1 <= x0:
        x1 = x0 + 1.0
    y0, y1 = ylim if ylim[1] > ylim[0] else (ylim[0], ylim[0] + 1.0)

    def px(x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, float)
        if xlog:
            x = np.log10(np.clip(x, xlim[0], None))
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: np.ndarray) -> np.ndarray:
        return top + ph - (np.asarray(y, float) - y0) / (y1 - y0) * ph

    # Grid and tick labels.
    if xlog:
        xticks = [10.0**k for k in range(math.ceil(x0 - 1e-9), math.floor(x1 + 1e-9) + 1)]
    else:
        xticks = _nice_ticks(x0, x1)
    for t in xticks:
        X = int(round(float(px(t))))
        cv2.line(img, (X, top), (X, top + ph), _GRID, 1)
        _text(img, _fmt(t) if not xlog else _decade(t), (X, top + ph + 14), anchor="center")
    for t in _nice_ticks(y0, y1):
        Y = int(round(float(py(t))))
        cv2.line(img, (left, Y), (left + pw, Y), _GRID, 1)
        _text(img, _fmt(t), (left - 6, Y), anchor="right")

    # Data, clipped to the plot area.
    plot = img[top : top + ph + 1, left : left + pw + 1]
    for i, s in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        if s.kind == "hist":
            edges, counts = np.asarray(s.x, float), np.asarray(s.y, float)
            overlay = plot.copy()
            for a, b, c in zip(edges[:-1], edges[1:], counts):
                p1 = (int(px(a)) - left, int(py(c)) - top)
                p2 = (int(px(b)) - left, int(py(y0)) - top)
                cv2.rectangle(overlay, p1, p2, colour, -1)
            cv2.addWeighted(overlay, 0.45, plot, 0.55, 0, dst=plot)
            step_x = np.repeat(edges, 2)[1:-1]
            step_y = np.repeat(counts, 2)
            pts = np.stack([px(step_x) - left, py(step_y) - top], 1)
        else:
            pts = np.stack([px(s.x) - left, py(s.y) - top], 1)
        pts = np.round(pts).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(plot, [pts], False, colour, 2, cv2.LINE_AA)

    # Frame, labels, title.
    cv2.rectangle(img, (left, top), (left + pw, top + ph), _BLACK, 1)
    _text(img, title, (left + pw // 2, top // 2), scale=0.55, anchor="center")
    _text(img, xlabel, (left + pw // 2, height - 14), anchor="center")
    if ylabel:
        (tw, th), _ = cv2.getTextSize(ylabel, _FONT, 0.45, 1)
        strip = np.full((th + 10, tw + 4, 3), 255, dtype=np.uint8)
        cv2.putText(strip, ylabel, (2, th + 2), _FONT, 0.45, _BLACK, 1, cv2.LINE_AA)
        strip = cv2.rotate(strip, cv2.ROTATE_90_COUNTERCLOCKWISE)
        y_start = max(top + ph // 2 - strip.shape[0] // 2, 0)
        y_stop = min(y_start + strip.shape[0], height)
        img[y_start:y_stop, 4 : 4 + strip.shape[1]] = strip[: y_stop - y_start]

    # Legend.
    labelled = [(i, s.label) for i, s in enumerate(series) if s.label]
    if labelled:
        lw = max(cv2.getTextSize(t, _FONT, 0.42, 1)[0][0] for _, t in labelled) + 40
        lh = 20 * len(labelled) + 8
        lx = left + pw - lw - 8 if "right" in legend else left + 8
        ly = top + 8 if "upper" in legend else top + ph - lh - 8
        cv2.rectangle(img, (lx, ly), (lx + lw, ly + lh), (255, 255, 255), -1)
        cv2.rectangle(img, (lx, ly), (lx + lw, ly + lh), (160, 160, 160), 1)
        for row, (i, label) in enumerate(labelled):
            yy = ly + 14 + 20 * row
            cv2.line(img, (lx + 6, yy), (lx + 28, yy), PALETTE[i % len(PALETTE)], 3)
            _text(img, label, (lx + 34, yy), scale=0.42)
    return img


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
