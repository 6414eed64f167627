"""Verification metrics on pairs of embeddings, pure numpy and vectorised.

Owns the numbers: the InsightFace 10-fold accuracy protocol, XNorm, EER, ROC and its AUC,
TAR at fixed FAR, the best-F1 operating point, and cosine / Euclidean pair scoring. It knows
nothing about images, models, files or ranks.

Conventions:
    * ``issame`` / ``labels`` are boolean (or 0/1) arrays, True for a genuine ("same") pair.
    * Scores are "higher = more alike" (cosine similarity, or minus a distance); a pair is
      accepted as genuine when ``score >= threshold``.
    * The k-fold protocol works on squared Euclidean *distances* of L2-normalised embeddings
      and predicts "same" when ``distance < threshold``, exactly as InsightFace does.

Every curve is computed by sorting once and counting with ``searchsorted`` / cumulative sums,
never by looping over thresholds in Python, so a million pairs take well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: InsightFace's threshold grid for the k-fold protocol (squared distance of unit vectors).
DEFAULT_THRESHOLDS = np.arange(0, 4, 0.01)

#: FARs at which :func:`tar_at_far` is reported by default.
DEFAULT_FARS = (1e-1, 1e-2, 1e-3, 1e-4)


# --------------------------------------------------------------------------------------------
# Embeddings -> scores
# --------------------------------------------------------------------------------------------


def l2_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (rows of norm 0 are left as they are).

    Computed the way ``sklearn.preprocessing.normalize`` does (norm from an einsum of squares,
    then a division), so distances match InsightFace's evaluator bit for bit.

    Args:
        embeddings: ``[N, D]`` float array.

    Returns:
        ``[N, D]`` array of the same float dtype.
    """
    x = np.asarray(embeddings)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be 2-D [N, D], got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    norms[norms == 0.0] = 1.0
    return x / norms[:, np.newaxis]


def _check_pairs(emb1: np.ndarray, emb2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    e1, e2 = np.asarray(emb1), np.asarray(emb2)
    if e1.ndim != 2 or e1.shape != e2.shape:
        raise ValueError(f"emb1 and emb2 must both be [P, D]; got {e1.shape} and {e2.shape}")
    return e1, e2


# Rows per block when scoring pairs: temporaries stay small (a million 512-d pairs would
# otherwise allocate several GB of intermediates) and results are identical row by row.
_BLOCK_ROWS = 16384


def _pair_blocks(
    emb1: np.ndarray, emb2: np.ndarray, normalize: bool, want_cos: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    e1, e2 = _check_pairs(emb1, emb2)
    dists, coss = [], []
    for start in range(0, max(e1.shape[0], 1), _BLOCK_ROWS):
        a, b = e1[start : start + _BLOCK_ROWS], e2[start : start + _BLOCK_ROWS]
        if normalize:
            a, b = l2_normalize(a), l2_normalize(b)
        # InsightFace's arithmetic, kept as is so distances (and accuracies) match it exactly.
        dists.append(np.sum(np.square(np.subtract(a, b)), axis=1))
        if want_cos:
            coss.append(np.einsum("ij,ij->i", a, b))
    return np.concatenate(dists), np.concatenate(coss) if want_cos else None


def squared_distances(emb1: np.ndarray, emb2: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Squared Euclidean distance of each pair (InsightFace's ``sum(square(e1 - e2))``).

    Args:
        emb1, emb2: ``[P, D]`` embeddings of the two sides of each pair.
        normalize: L2-normalise the rows first (then distances lie in ``[0, 4]``).

    Returns:
        ``[P]`` distances, in the embeddings' float dtype.
    """
    return _pair_blocks(emb1, emb2, normalize, want_cos=False)[0]


def distances_and_scores(emb1: np.ndarray, emb2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Squared distances and cosine scores of pairs, normalising the embeddings only once.

    Returns:
        ``([P] squared Euclidean distances of the L2-normalised rows, exactly as
        :func:`squared_distances`, [P] cosine similarities)``.
    """
    dist, cos = _pair_blocks(emb1, emb2, normalize=True, want_cos=True)
    return dist, cos


def cosine_scores(emb1: np.ndarray, emb2: np.ndarray) -> np.ndarray:
    """Cosine similarity of each pair, ``[P]`` in ``[-1, 1]`` (higher = more alike)."""
    return distances_and_scores(emb1, emb2)[1]


def euclidean_scores(emb1: np.ndarray, emb2: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Minus the Euclidean distance of each pair, ``[P]`` (higher = more alike).

    With ``normalize=True`` this ranks pairs exactly as :func:`cosine_scores` does
    (``d² = 2 - 2·cos``); the thresholds are then in distance units instead.
    """
    return -np.sqrt(squared_distances(emb1, emb2, normalize=normalize))


def pair_scores(emb1: np.ndarray, emb2: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Scores of pairs by ``metric``: ``"cosine"`` or ``"euclidean"`` (higher = more alike)."""
    if metric == "cosine":
        return cosine_scores(emb1, emb2)
    if metric == "euclidean":
        return euclidean_scores(emb1, emb2)
    raise ValueError(f"unknown scoring metric {metric!r}; expected 'cosine' or 'euclidean'")


def xnorm(embeddings: np.ndarray) -> float:
    """Mean L2 norm of the (unnormalised) embeddings, InsightFace's "XNorm".

    Args:
        embeddings: ``[N, D]`` raw backbone outputs.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"embeddings must be a non-empty [N, D] array, got shape {x.shape}")
    return float(np.mean(np.sqrt(np.einsum("ij,ij->i", x, x))))


# --------------------------------------------------------------------------------------------
# The InsightFace k-fold accuracy protocol
# --------------------------------------------------------------------------------------------


def kfold_splits(num_pairs: int, n_folds: int) -> list[tuple[int, int]]:
    """Contiguous test folds ``[(start, stop), ...]`` as ``KFold(n_folds, shuffle=False)``.

    The first ``num_pairs % n_folds`` folds hold one pair more than the others. With
    ``n_folds == 1`` the single fold is everything (InsightFace's ``LFold`` then trains and tests
    on the same pairs).
    """
    if n_folds < 1:
        raise ValueError(f"n_folds must be >= 1, got {n_folds}")
    if n_folds > 1 and num_pairs < n_folds:
        raise ValueError(f"cannot split {num_pairs} pairs into {n_folds} folds")
    base, extra = divmod(num_pairs, n_folds)
    sizes = [base + (1 if i < extra else 0) for i in range(n_folds)]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [(int(bounds[i]), int(bounds[i + 1])) for i in range(n_folds)]


@dataclass
class KFoldResult:
    """Outcome of the k-fold protocol.

    Attributes:
        accuracy: mean test-fold accuracy.
        accuracy_std: population std (``np.std``) of the test-fold accuracies.
        fold_accuracies: ``[n_folds]`` test accuracy of each fold.
        fold_thresholds: ``[n_folds]`` distance threshold chosen on each fold's training part.
        thresholds: ``[T]`` the threshold grid.
        tpr, fpr: ``[T]`` true/false positive rates on the test folds, averaged over folds
            (InsightFace's ROC).
    """

    accuracy: float
    accuracy_std: float
    fold_accuracies: np.ndarray
    fold_thresholds: np.ndarray
    thresholds: np.ndarray
    tpr: np.ndarray = field(repr=False)
    fpr: np.ndarray = field(repr=False)


def _below_counts(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``[T]`` number of values strictly below each threshold (values sorted ascending)."""
    return np.searchsorted(sorted_values, thresholds, side="left")


def kfold_from_distances(
    distances: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    thresholds: np.ndarray | None = None,
) -> KFoldResult:
    """k-fold verification accuracy from pair distances ("same" when ``distance < t``).

    For each contiguous fold, the threshold maximising accuracy on the other folds is chosen
    (the first such grid point on ties, as ``np.argmax`` does) and accuracy is measured on the
    fold. Counts come from ``searchsorted`` on each fold's sorted genuine and impostor
    distances; the training counts are the totals minus the fold's, so the cost is
    ``O(P log P + n_folds · T log P)`` with no loop over thresholds.

    Args:
        distances: ``[P]`` float distances (NaN not allowed).
        issame: ``[P]`` bool, True for genuine pairs.
        n_folds: number of folds (InsightFace uses 10).
        thresholds: ``[T]`` ascending grid; default ``np.arange(0, 4, 0.01)``.
    """
    dist = np.asarray(distances)
    same = np.asarray(issame).astype(bool)
    if dist.ndim != 1 or same.shape != dist.shape:
        raise ValueError(f"distances {dist.shape} and issame {same.shape} must be equal [P]")
    if np.isnan(dist).any():
        raise ValueError("distances contain NaN (are some embeddings NaN?)")
    grid = DEFAULT_THRESHOLDS if thresholds is None else np.asarray(thresholds)
    folds = kfold_splits(dist.shape[0], n_folds)

    # Per fold and threshold: genuine pairs predicted same (TP) and impostors predicted same (FP).
    tp = np.empty((n_folds, grid.size), dtype=np.int64)
    fp = np.empty((n_folds, grid.size), dtype=np.int64)
    n_same = np.empty(n_folds, dtype=np.int64)
    n_pairs = np.empty(n_folds, dtype=np.int64)
    for k, (start, stop) in enumerate(folds):
        d, s = dist[start:stop], same[start:stop]
        tp[k] = _below_counts(np.sort(d[s]), grid)
        fp[k] = _below_counts(np.sort(d[~s]), grid)
        n_same[k], n_pairs[k] = s.sum(), stop - start
    n_diff = n_pairs - n_same

    # Correct decisions = TP + TN = TP + (n_diff - FP); integers, so argmax ties are exact.
    correct = tp + (n_diff[:, None] - fp)
    fold_acc = np.empty(n_folds)
    fold_thr = np.empty(n_folds)
    total_correct = correct.sum(axis=0)
    for k in range(n_folds):
        train_correct = total_correct - correct[k] if n_folds > 1 else correct[k]
        best = int(np.argmax(train_correct))
        fold_thr[k] = grid[best]
        fold_acc[k] = float(correct[k, best]) / float(n_pairs[k])

    # InsightFace reports a rate of 0 for a fold without genuine (or impostor) pairs.
    tpr = tp / np.maximum(n_same, 1)[:, None]
    fpr = fp / np.maximum(n_diff, 1)[:, None]
    return KFoldResult(
        accuracy=float(np.mean(fold_acc)),
        accuracy_std=float(np.std(fold_acc)),
        fold_accuracies=fold_acc,
        fold_thresholds=fold_thr,
        thresholds=grid,
        tpr=tpr.mean(axis=0),
        fpr=fpr.mean(axis=0),
    )


def kfold_verification(
    emb1: np.ndarray,
    emb2: np.ndarray,
    issame: np.ndarray,
    n_folds: int = 10,
    thresholds: np.ndarray | None = None,
) -> KFoldResult:
    """InsightFace's k-fold protocol on embedding pairs, with per-fold thresholds.

    Args:
        emb1, emb2: ``[P, D]`` embeddings of the two sides of each pair (not yet normalised).
        issame: ``[P]`` bool.
        n_folds: folds (10 for LFW / CFP-FP / AgeDB-30).
        thresholds: squared-distance grid; default ``np.arange(0, 4, 0.01)``.
    """
    return kfold_from_distances(squared_distances(emb1, emb2), issame, n_folds, thresholds)


def kfold_accuracy(
    emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, n_folds: int = 10
) -> tuple[float, float]:
    """Mean and std of the 10-fold verification accuracy (InsightFace protocol).

    Args:
        emb1, emb2: ``[P, D]`` embeddings of the two sides of each pair.
        issame: ``[P]`` bool, True for genuine pairs.
        n_folds: number of contiguous, unshuffled folds.

    Returns:
        ``(mean, std)`` of the per-fold test accuracies.
    """
    result = kfold_verification(emb1, emb2, issame, n_folds)
    return result.accuracy, result.accuracy_std


# --------------------------------------------------------------------------------------------
# Threshold-free curves on scores (higher = same)
# --------------------------------------------------------------------------------------------


@dataclass
class OperatingCurve:
    """Counts at every distinct score threshold, from "accept nothing" to "accept everything".

    Index 0 is the threshold ``+inf`` (nothing accepted); index ``i > 0`` accepts every pair
    with ``score >= thresholds[i]``. Thresholds decrease along the arrays.

    Attributes:
        thresholds: ``[K+1]`` float64.
        tp: ``[K+1]`` genuine pairs accepted.
        fp: ``[K+1]`` impostor pairs accepted.
        num_genuine, num_impostor: totals.
    """

    thresholds: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    num_genuine: int
    num_impostor: int

    @property
    def tpr(self) -> np.ndarray:
        return self.tp / max(self.num_genuine, 1)

    @property
    def fpr(self) -> np.ndarray:
        return self.fp / max(self.num_impostor, 1)

    @property
    def fnr(self) -> np.ndarray:
        return 1.0 - self.tpr


def _check_scores(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels)
    if s.ndim != 1 or y.shape != s.shape:
        raise ValueError(f"scores {s.shape} and labels {y.shape} must both be [P]")
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("need both genuine (label 1) and impostor (label 0) pairs")
    return s, y


def operating_curve(scores: np.ndarray, labels: np.ndarray) -> OperatingCurve:
    """Cumulative genuine/impostor acceptances at every distinct score (one sort).

    Args:
        scores: ``[P]`` higher = more alike.
        labels: ``[P]`` bool / 0-1, True for genuine pairs.
    """
    s, y = _check_scores(scores, labels)
    # A value sort (no argsort: numpy's SIMD sort of values is several times faster, and the
    # labels need not travel with the scores): the distinct scores, how many pairs hold each,
    # and how many of those are genuine (the few genuine scores located by binary search).
    s_sorted = np.sort(s)
    first = np.flatnonzero(np.r_[True, s_sorted[1:] != s_sorted[:-1]])
    distinct = s_sorted[first]
    per_value = np.diff(np.r_[first, s.size])
    genuine = np.bincount(np.searchsorted(distinct, s[y]), minlength=distinct.size)
    # From the highest score down: a threshold accepts all ties at once.
    tp_cum = np.cumsum(genuine[::-1])
    fp_cum = np.cumsum(per_value[::-1]) - tp_cum
    return OperatingCurve(
        thresholds=np.r_[np.inf, distinct[::-1]],
        tp=np.r_[0, tp_cum],
        fp=np.r_[0, fp_cum],
        num_genuine=int(y.sum()),
        num_impostor=int((~y).sum()),
    )


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC points ``(fpr, tpr, thresholds)``, each ``[K+1]``, thresholds decreasing."""
    curve = operating_curve(scores, labels)
    return curve.fpr, curve.tpr, curve.thresholds


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (ties count one half, as ``sklearn.metrics.roc_auc_score``)."""
    fpr, tpr, _ = roc_curve(scores, labels)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


def eer(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Equal error rate and its threshold.

    The false-reject rate ``FRR(t) = #{genuine < t}/G`` falls and the false-accept rate
    ``FAR(t) = #{impostor >= t}/I`` rises as the threshold ``t`` moves down the sorted
    distinct scores. The EER is where the segment between the last ROC point with
    ``FRR > FAR`` and the first with ``FRR <= FAR`` crosses the diagonal (linear
    interpolation of both rates along that segment); the threshold returned is the score of
    that first point with ``FRR <= FAR`` (accept when ``score >= threshold``).

    Args:
        scores: ``[P]`` higher = more alike.
        labels: ``[P]`` True / 1 for genuine pairs.

    Returns:
        ``(eer, threshold)``; ``eer`` in ``[0, 1]``.
    """
    curve = operating_curve(scores, labels)
    far, frr = curve.fpr, curve.fnr
    gap = frr - far  # non-increasing from +1 (accept nothing) to -1 (accept everything)
    i = int(np.argmax(gap <= 0))
    if i == 0:  # only possible with no genuine pairs, excluded by _check_scores
        return float(far[0]), float(curve.thresholds[0])
    # Point i-1 has gap > 0 and point i has gap <= 0: interpolate the zero crossing.
    w = gap[i - 1] / (gap[i - 1] - gap[i])
    rate = far[i - 1] + w * (far[i] - far[i - 1])
    return float(rate), float(curve.thresholds[i])


@dataclass
class TarAtFar:
    """One TAR@FAR operating point.

    Attributes:
        far: the requested false accept rate.
        tar: true accept rate at the chosen threshold (NaN when ``far`` is below
            ``1 / num_impostors`` and so cannot be measured on this set).
        threshold: accept when ``score >= threshold``.
        achieved_far: false accept rate at that threshold (``<= far``).
        num_impostors: impostor pairs behind the estimate.
        num_false_accepts: impostors accepted at that threshold.
    """

    far: float
    tar: float
    threshold: float
    achieved_far: float
    num_impostors: int
    num_false_accepts: int

    @property
    def resolvable(self) -> bool:
        """Whether the set has enough impostors to measure this FAR (``far·I >= 1``)."""
        return self.far * self.num_impostors >= 1.0


def tar_at_far(
    scores: np.ndarray, labels: np.ndarray, fars: tuple[float, ...] = DEFAULT_FARS
) -> list[TarAtFar]:
    """True accept rate at the lowest threshold whose false accept rate is at most each FAR.

    Args:
        scores: ``[P]`` higher = more alike.
        labels: ``[P]`` True / 1 for genuine pairs.
        fars: target false accept rates.

    Returns:
        One :class:`TarAtFar` per requested FAR, in the given order.
    """
    curve = operating_curve(scores, labels)
    fpr, tpr = curve.fpr, curve.tpr
    out = []
    for target in fars:
        # fpr is non-decreasing along the curve: the last point with fpr <= target is the
        # lowest admissible threshold (index 0, accept nothing, always qualifies).
        i = int(np.searchsorted(fpr, target, side="right")) - 1
        item = TarAtFar(
            far=float(target),
            tar=float(tpr[i]),
            threshold=float(curve.thresholds[i]),
            achieved_far=float(fpr[i]),
            num_impostors=curve.num_impostor,
            num_false_accepts=int(curve.fp[i]),
        )
        if not item.resolvable:
            item.tar = float("nan")
        out.append(item)
    return out


def roc_curve_reduced(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC as ``sklearn.metrics.roc_curve`` returns it by default (``drop_intermediate``).

    The points of :func:`operating_curve` without those lying on a straight segment between
    their neighbours (zero second difference of both counts), then the "accept nothing"
    point in front. Reading a TAR off the nearest FPR point (:func:`tar_at_nearest_far`)
    depends on which points exist, so InsightFace's IJB numbers need exactly these.

    Returns:
        ``(fpr, tpr, thresholds)``, each ``[K'+1]``, thresholds decreasing from ``+inf``.
    """
    curve = operating_curve(scores, labels)
    tp, fp, thr = curve.tp[1:], curve.fp[1:], curve.thresholds[1:]
    if tp.size > 2:
        bends = np.logical_or(np.diff(fp, 2) != 0, np.diff(tp, 2) != 0)
        keep = np.flatnonzero(np.r_[True, bends, True])
        tp, fp, thr = tp[keep], fp[keep], thr[keep]
    fpr = np.r_[0, fp] / curve.num_impostor
    tpr = np.r_[0, tp] / curve.num_genuine
    return fpr, tpr, np.r_[np.inf, thr]


def tar_at_nearest_far(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float]) -> list[float]:
    """TAR at each FAR read off the ROC point whose FPR is nearest, as InsightFace's IJB
    evaluation reads it (no interpolation, no "FPR at most" rule).

    The curve is searched from its high-threshold end backwards (InsightFace flips it), so
    among points at the same distance the last one wins: at equal FPR the highest TPR, and
    between two FPRs equally far from the target the larger.

    Args:
        fpr, tpr: ``[K]`` ROC points in increasing FPR order (:func:`roc_curve_reduced`).
        fars: target false accept rates.
    """
    fpr_back, tpr_back = fpr[::-1], tpr[::-1]
    return [float(tpr_back[int(np.argmin(np.abs(fpr_back - far)))]) for far in fars]


def trapezoid_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC given by its points (trapezoid rule, as ``sklearn.metrics.auc``)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


@dataclass
class BestF1:
    """Operating point maximising F1 with genuine pairs as positives (accept ``>= threshold``)."""

    f1: float
    threshold: float
    precision: float
    recall: float


def precision_recall_curve(
    scores: np.ndarray, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(precision, recall, thresholds)`` at every distinct score (accept-nothing excluded)."""
    curve = operating_curve(scores, labels)
    tp, fp = curve.tp[1:], curve.fp[1:]
    return tp / (tp + fp), tp / curve.num_genuine, curve.thresholds[1:]


def best_f1(scores: np.ndarray, labels: np.ndarray) -> BestF1:
    """Threshold with the highest F1 (the first, i.e. the highest threshold, on ties)."""
    curve = operating_curve(scores, labels)
    tp, fp = curve.tp[1:], curve.fp[1:]
    fn = curve.num_genuine - tp
    f1 = 2.0 * tp / (2.0 * tp + fp + fn)
    i = int(np.argmax(f1))
    return BestF1(
        f1=float(f1[i]),
        threshold=float(curve.thresholds[1 + i]),
        precision=float(tp[i] / (tp[i] + fp[i])),
        recall=float(tp[i] / curve.num_genuine),
    )


def far_label(far: float) -> str:
    """``1e-3`` -> ``"1e-3"`` (the key suffix of ``tar@far=...`` metrics)."""
    mantissa, exponent = f"{far:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"
