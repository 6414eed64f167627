"""Tests of eval.metrics against straightforward loop references and scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import sklearn.metrics
import sklearn.preprocessing
from sklearn.model_selection import KFold

from eval import metrics

# ---------------------------------------------------------------------------------------------
# Reference: InsightFace's evaluator written as the plain threshold-grid loop.
# ---------------------------------------------------------------------------------------------


def _ref_accuracy(threshold, dist, issame):
    predict = np.less(dist, threshold)
    tp = np.sum(np.logical_and(predict, issame))
    tn = np.sum(np.logical_and(np.logical_not(predict), np.logical_not(issame)))
    return float(tp + tn) / dist.size


def _ref_kfold_from_dist(dist, issame, n_folds=10, thresholds=None):
    thresholds = np.arange(0, 4, 0.01) if thresholds is None else thresholds
    acc = np.zeros(n_folds)
    chosen = np.zeros(n_folds)
    indices = np.arange(dist.size)
    splits = (
        KFold(n_splits=n_folds, shuffle=False).split(indices)
        if n_folds > 1
        else [(indices, indices)]
    )
    for fold, (train, test) in enumerate(splits):
        acc_train = np.zeros(len(thresholds))
        for i, t in enumerate(thresholds):
            acc_train[i] = _ref_accuracy(t, dist[train], issame[train])
        best = np.argmax(acc_train)
        chosen[fold] = thresholds[best]
        acc[fold] = _ref_accuracy(thresholds[best], dist[test], issame[test])
    return acc, chosen


def _ref_kfold(emb1, emb2, issame, n_folds=10):
    e1 = sklearn.preprocessing.normalize(emb1)
    e2 = sklearn.preprocessing.normalize(emb2)
    dist = np.sum(np.square(np.subtract(e1, e2)), 1)
    return _ref_kfold_from_dist(dist, issame, n_folds)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("num_pairs", [37, 200])
def test_kfold_matches_reference_on_embeddings(seed, num_pairs):
    rng = np.random.default_rng(seed)
    issame = rng.random(num_pairs) < 0.5
    emb1 = rng.normal(size=(num_pairs, 8)).astype(np.float32)
    # Genuine pairs are noisy copies; a few exact duplicates make distances of exactly 0.
    emb2 = np.where(issame[:, None], emb1 + rng.normal(scale=0.8, size=emb1.shape), emb1 * 0)
    emb2[~issame] = rng.normal(size=(int((~issame).sum()), 8))
    emb2[:3] = emb1[:3]
    emb2 = emb2.astype(np.float32)
    ref_acc, ref_thr = _ref_kfold(emb1, emb2, issame)
    result = metrics.kfold_verification(emb1, emb2, issame)
    np.testing.assert_array_equal(result.fold_accuracies, ref_acc)
    np.testing.assert_array_equal(result.fold_thresholds, ref_thr)
    mean, std = metrics.kfold_accuracy(emb1, emb2, issame)
    assert mean == np.mean(ref_acc) and std == np.std(ref_acc)


@pytest.mark.parametrize("seed", [3, 4])
@pytest.mark.parametrize("n_folds", [1, 3, 10])
def test_kfold_matches_reference_with_ties_on_the_grid(seed, n_folds):
    # Distances drawn from the grid itself (strict "<" matters) and coarsely, so many
    # thresholds tie on training accuracy and argmax's first-index rule decides.
    rng = np.random.default_rng(seed)
    grid = np.arange(0, 4, 0.01)
    dist = grid[rng.integers(0, 400, size=123)][rng.permutation(123)]
    dist[::7] = dist[0]
    issame = rng.random(123) < 0.4
    ref_acc, ref_thr = _ref_kfold_from_dist(dist, issame, n_folds)
    result = metrics.kfold_from_distances(dist, issame, n_folds)
    np.testing.assert_array_equal(result.fold_accuracies, ref_acc)
    np.testing.assert_array_equal(result.fold_thresholds, ref_thr)


def test_kfold_folds_are_contiguous_like_sklearn():
    for n, k in [(6000, 10), (37, 10), (11, 3), (5, 1)]:
        expected = (
            [(int(t[0]), int(t[-1]) + 1) for _, t in KFold(k, shuffle=False).split(np.arange(n))]
            if k > 1
            else [(0, n)]
        )
        assert metrics.kfold_splits(n, k) == expected


def test_kfold_on_separable_pairs_is_perfect_and_checks_shapes():
    rng = np.random.default_rng(0)
    emb1 = rng.normal(size=(100, 16))
    issame = np.arange(100) % 2 == 0
    emb2 = np.where(issame[:, None], emb1, -emb1)
    assert metrics.kfold_accuracy(emb1, emb2, issame) == (1.0, 0.0)
    with pytest.raises(ValueError, match="must both be"):
        metrics.kfold_accuracy(emb1, emb2[:50], issame)
    with pytest.raises(ValueError, match="cannot split"):
        metrics.kfold_accuracy(emb1[:5], emb2[:5], issame[:5])


def test_l2_normalize_matches_sklearn_bitwise():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32)
    x[3] = 0
    np.testing.assert_array_equal(metrics.l2_normalize(x), sklearn.preprocessing.normalize(x))


# ---------------------------------------------------------------------------------------------
# Threshold-free metrics
# ---------------------------------------------------------------------------------------------


def _tied_scores(seed, n=400):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = np.round(rng.normal(size=n) + labels * 1.2, 1)  # rounding makes many ties
    return scores, labels


@pytest.mark.parametrize("seed", range(4))
def test_roc_auc_matches_sklearn_with_ties(seed):
    scores, labels = _tied_scores(seed)
    assert metrics.roc_auc(scores, labels) == pytest.approx(
        sklearn.metrics.roc_auc_score(labels, scores), abs=1e-12
    )


def test_roc_curve_matches_sklearn():
    scores, labels = _tied_scores(7)
    fpr, tpr, thr = metrics.roc_curve(scores, labels)
    sk_fpr, sk_tpr, sk_thr = sklearn.metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_array_equal(thr[1:], sk_thr[1:])


def _ref_rates(scores, labels, t):
    far = np.mean(scores[~labels] >= t)
    frr = np.mean(scores[labels] < t)
    return far, frr


@pytest.mark.parametrize("seed", range(4))
def test_eer_against_brute_force_crossing(seed):
    scores, labels = _tied_scores(seed)
    rate, thr = metrics.eer(scores, labels)
    # Brute force over every candidate threshold: the returned one is the highest at which
    # FRR <= FAR, and the EER lies between the rates of its neighbour points.
    cands = np.unique(scores)[::-1]
    rates = [_ref_rates(scores, labels, t) for t in cands]
    first = next(i for i, (far, frr) in enumerate(rates) if frr <= far)
    assert thr == cands[first]
    far_hi, frr_hi = rates[first]
    far_lo, frr_lo = rates[first - 1] if first > 0 else (0.0, 1.0)
    assert min(far_lo, frr_hi) - 1e-12 <= rate <= max(frr_lo, far_hi) + 1e-12
    # The interpolated crossing: FAR and FRR lines meet at the same value.
    w = (frr_lo - far_lo) / ((frr_lo - far_lo) - (frr_hi - far_hi))
    assert rate == pytest.approx(far_lo + w * (far_hi - far_lo))
    assert rate == pytest.approx(frr_lo + w * (frr_hi - frr_lo))


def test_eer_gaussian_and_extremes():
    rng = np.random.default_rng(0)
    n = 200_000
    labels = np.arange(n) < n // 2
    scores = rng.normal(size=n) + np.where(labels, 1.0, -1.0)
    rate, thr = metrics.eer(scores, labels)
    assert rate == pytest.approx(0.158655, abs=0.003)  # Phi(-1)
    assert abs(thr) < 0.02
    # Perfect separation: EER 0, threshold = lowest genuine score.
    rate, thr = metrics.eer(np.array([0.9, 0.8, 0.1, 0.2]), np.array([1, 1, 0, 0]))
    assert rate == 0.0 and thr == 0.8
    # Perfectly wrong: EER 1.
    assert metrics.eer(np.array([0.1, 0.2, 0.9, 0.8]), np.array([1, 1, 0, 0]))[0] == 1.0
    with pytest.raises(ValueError, match="both genuine"):
        metrics.eer(np.ones(3), np.ones(3))


def test_tar_at_far_brute_force():
    rng = np.random.default_rng(1)
    labels = rng.random(5000) < 0.2
    scores = np.round(rng.normal(size=5000) + 2 * labels, 2)
    points = metrics.tar_at_far(scores, labels, fars=(1e-1, 1e-2, 1e-3, 1e-4))
    n_imp = int((~labels).sum())
    for p in points:
        assert p.num_impostors == n_imp
        # Brute force: lowest threshold among distinct scores with FAR <= target.
        ok = [t for t in np.unique(scores) if np.mean(scores[~labels] >= t) <= p.far]
        if p.far * n_imp < 1:
            assert np.isnan(p.tar) and not p.resolvable
            continue
        t = min(ok)
        assert p.threshold == t
        assert p.tar == np.mean(scores[labels] >= t)
        assert p.achieved_far == np.mean(scores[~labels] >= t) <= p.far
        assert p.num_false_accepts == int(np.sum(scores[~labels] >= t))


def test_best_f1_brute_force():
    scores, labels = _tied_scores(5)
    best = metrics.best_f1(scores, labels)
    f1s = [sklearn.metrics.f1_score(labels, scores >= t) for t in np.unique(scores)[::-1]]
    assert best.f1 == pytest.approx(max(f1s))
    assert best.threshold == np.unique(scores)[::-1][int(np.argmax(f1s))]
    pred = scores >= best.threshold
    assert best.precision == pytest.approx(sklearn.metrics.precision_score(labels, pred))
    assert best.recall == pytest.approx(sklearn.metrics.recall_score(labels, pred))
    prec, rec, thr = metrics.precision_recall_curve(scores, labels)
    assert prec.shape == rec.shape == thr.shape and rec[-1] == 1.0


def test_scores_and_xnorm():
    rng = np.random.default_rng(0)
    e1, e2 = rng.normal(size=(20, 5)), rng.normal(size=(20, 5))
    cos = metrics.cosine_scores(e1, e2)
    ref = np.sum(e1 * e2, 1) / np.linalg.norm(e1, axis=1) / np.linalg.norm(e2, axis=1)
    np.testing.assert_allclose(cos, ref)
    np.testing.assert_allclose(metrics.pair_scores(e1, e2, "euclidean"), -np.sqrt(2 - 2 * ref))
    np.testing.assert_allclose(
        metrics.euclidean_scores(e1, e2, normalize=False), -np.linalg.norm(e1 - e2, axis=1)
    )
    assert metrics.xnorm(e1) == pytest.approx(np.mean(np.linalg.norm(e1, axis=1)))
    with pytest.raises(ValueError, match="unknown scoring"):
        metrics.pair_scores(e1, e2, "manhattan")
    assert metrics.far_label(1e-3) == "1e-3" and metrics.far_label(0.1) == "1e-1"


@pytest.mark.parametrize("dim", [8, 512])
def test_blocked_distances_equal_insightface_arithmetic_bitwise(dim):
    rng = np.random.default_rng(0)
    n = metrics._BLOCK_ROWS * 2 + 5 if dim == 8 else 1000
    e1 = rng.normal(size=(n, dim)).astype(np.float32)
    e2 = rng.normal(size=(n, dim)).astype(np.float32)
    n1 = sklearn.preprocessing.normalize(e1)
    n2 = sklearn.preprocessing.normalize(e2)
    ref = np.sum(np.square(np.subtract(n1, n2)), 1)
    dist, cos = metrics.distances_and_scores(e1, e2)
    np.testing.assert_array_equal(dist, ref)
    np.testing.assert_array_equal(metrics.squared_distances(e1, e2), ref)
    np.testing.assert_allclose(cos, np.sum(n1 * n2, 1), rtol=1e-5, atol=1e-6)


def test_kfold_float32_distances_rounded_from_grid_points():
    # float32(t) lies just above or just below the float64 grid point t: the count of
    # "distance < t" must follow float64 comparison, as InsightFace's np.less does.
    rng = np.random.default_rng(9)
    grid32 = np.arange(0, 4, 0.01).astype(np.float32)
    assert (grid32.astype(np.float64) < np.arange(0, 4, 0.01)).any()
    dist = grid32[rng.integers(100, 300, size=150)]
    issame = rng.random(150) < 0.5
    ref_acc, ref_thr = _ref_kfold_from_dist(dist, issame)
    result = metrics.kfold_from_distances(dist, issame)
    np.testing.assert_array_equal(result.fold_accuracies, ref_acc)
    np.testing.assert_array_equal(result.fold_thresholds, ref_thr)
