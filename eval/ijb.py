"""IJB-B / IJB-C template evaluation with InsightFace's conventions.

Owns the IJB release layout (reading ``meta/``: :func:`read_meta`), the raw feature cache of an
IJB run (:func:`load_cached_features`, :func:`save_cached_features`) and the scoring, pure numpy
and vectorised: image features from the two views (:func:`image_features`), media then template
pooling (:func:`template_features`), 1:1 pair scores (:func:`pair_scores`) with TAR@FAR and AUC
(:func:`verification_metrics`), and 1:N identification per gallery (:func:`identify`,
:func:`identification_metrics`). :func:`evaluate` runs them all.

Does not own: turning loose crops into features (``eval.runner.extract_ijb_features``, through
the alignment of ``dist_train.data.align`` and the extraction of ``eval.extract``), the ROC
arithmetic (``eval.metrics``), nor writing reports (``eval.report``).

Layout (``DIR`` is InsightFace's ``--image-path``; ``<t>`` is ``ijbb`` or ``ijbc``):
    * ``DIR/loose_crop/<name>``: the images.
    * ``DIR/meta/<t>_name_5pts_score.txt``: ``name x1 y1 ... x5 y5 score`` per image (the five
      landmarks in the order of ``dist_train.data.align``, the detector's faceness score).
    * ``DIR/meta/<t>_face_tid_mid.txt``: ``name template_id media_id``, same rows in the same
      order as the landmarks file.
    * ``DIR/meta/<t>_template_pair_label.txt``: ``template1 template2 label`` (1 = same subject).
    * ``DIR/meta/<t>_1N_gallery_G1.csv``, ``..._G2.csv`` (IJB-B: ``S1``, ``S2``) and
      ``<t>_1N_probe_mixed.csv``: a header line, then ``TEMPLATE_ID,SUBJECT_ID,...`` rows (one
      per image; the template is what counts). Optional: without them 1:N is skipped.

Conventions (InsightFace's ``recognition/arcface_torch/eval_ijbc.py`` and
``recognition/_evaluation_/ijb/ijb_evals.py``):
    * image feature = f(crop) + f(mirrored crop) with the flip switch, else f(crop); without
      the norm-score switch each image feature is L2-normalised (its norm no longer weighs it);
      with the detector-score switch it is multiplied by the faceness score. Defaults: flip on,
      norm score on (features keep their norms), detector score on.
    * inside a template, the images of one media (a video's frames, or a single photo) are
      averaged, the media features are summed, and the sum is L2-normalised.
    * a pair's score is the dot product of its two template features (cosine).
    * TAR at FAR 1e-6 ... 1e-1 is read off scikit-learn's default ROC (intermediate collinear
      points dropped) at the point whose FPR is nearest the target, searched from the high
      threshold end; AUC is the trapezoid area of that ROC.
    * 1:N: each gallery separately; a probe is mated when its subject has a template in the
      gallery. Rank-k counts the mated probes whose mate is among the k most similar gallery
      templates; TPIR at FPIR f counts the mated probes ranked first *and* scoring above the
      threshold that the fraction f of the non-mated probes exceed (their highest score
      against the gallery, sorted, item ``max(int(n f) - 1, 0)``). Reported: rank-k = the hits
      of both galleries over the number of probe templates, TPIR = mean of the galleries'.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eval import metrics
from eval.targets import TargetError

#: target -> (file prefix, gallery names)
TARGETS: dict[str, tuple[str, tuple[str, str]]] = {
    "IJBB": ("ijbb", ("S1", "S2")),
    "IJBC": ("ijbc", ("G1", "G2")),
}

#: FARs of the 1:1 table (InsightFace's ``x_labels``).
FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

#: Ranks of the 1:N CMC.
RANKS: tuple[int, ...] = (1, 5, 10)

#: FPIR labels and the values ``ijb_evals.py`` uses for them: items 0, 25, 50, 75 of
#: ``10 ** arange(-4, 0, 0.04)`` (a few ulps above the decimal values, which can move
#: ``int(n * f)`` by one).
FPIRS: tuple[tuple[str, float], ...] = tuple(
    (label, float(10.0 ** np.arange(-4, 0, 4 / 100)[i]))
    for label, i in (("1e-4", 0), ("1e-3", 25), ("1e-2", 50), ("1e-1", 75))
)


class IJBError(TargetError):
    """A bad IJB folder or meta file; the message names the file (and line)."""


# --------------------------------------------------------------------------------------------
# Meta files
# --------------------------------------------------------------------------------------------


@dataclass
class TemplateSet:
    """The templates of a 1:N gallery or probe file.

    Attributes:
        name: ``G1``, ``S2``, ``probe`` ...
        path: the csv file.
        templates: ``[G]`` int64 distinct template ids, increasing.
        subjects: ``[G]`` int64 subject id of each template.
    """

    name: str
    path: str
    templates: np.ndarray
    subjects: np.ndarray


@dataclass
class IJBMeta:
    """One IJB target's meta data, row ``i`` of the per-image arrays being image ``i``.

    Attributes:
        target: ``IJBB`` or ``IJBC``.
        root: the folder holding ``loose_crop/`` and ``meta/``.
        names: ``N`` image file names (relative to ``loose_crop/``).
        landmarks: ``[N, 5, 2]`` float32 landmarks in image pixels.
        face_scores: ``[N]`` float32 detector (faceness) scores.
        templates: ``[N]`` int64 template id of each image.
        medias: ``[N]`` int64 media id of each image.
        pairs: ``[P, 2]`` int64 template ids of the 1:1 pairs.
        labels: ``[P]`` bool, True for same-subject pairs.
        galleries: the 1:N galleries (empty when the 1:N files are absent).
        probes: the 1:N mixed probes (None when absent).
        files: role -> path of every meta file read.
    """

    target: str
    root: str
    names: list[str]
    landmarks: np.ndarray
    face_scores: np.ndarray
    templates: np.ndarray
    medias: np.ndarray
    pairs: np.ndarray
    labels: np.ndarray
    galleries: list[TemplateSet] = field(default_factory=list)
    probes: TemplateSet | None = None
    files: dict[str, str] = field(default_factory=dict)

    @property
    def num_images(self) -> int:
        return len(self.names)

    @property
    def num_templates(self) -> int:
        return int(np.unique(self.templates).size)

    @property
    def num_pairs(self) -> int:
        return int(self.labels.size)

    def image_path(self, i: int) -> str:
        return os.path.join(self.root, "loose_crop", self.names[i])


def meta_files(root: str, target: str) -> dict[str, str]:
    """Role -> path of the meta files of ``target`` under ``root`` (present or not).

    Raises:
        IJBError: ``target`` is not ``IJBB`` / ``IJBC``.
    """
    key = target.upper()
    if key not in TARGETS:
        raise IJBError(f"unknown IJB target {target!r}; expected one of {sorted(TARGETS)}")
    prefix, galleries = TARGETS[key]
    meta = os.path.join(root, "meta")
    files = {
        "landmarks": os.path.join(meta, f"{prefix}_name_5pts_score.txt"),
        "templates": os.path.join(meta, f"{prefix}_face_tid_mid.txt"),
        "pairs": os.path.join(meta, f"{prefix}_template_pair_label.txt"),
    }
    for g in galleries:
        files[g] = os.path.join(meta, f"{prefix}_1N_gallery_{g}.csv")
    files["probe"] = os.path.join(meta, f"{prefix}_1N_probe_mixed.csv")
    return files


def _lines(path: str) -> list[tuple[int, str]]:
    """``(line number, text)`` of the non-blank lines of a text file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise IJBError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise IJBError(f"{path}: not a text file ({exc.reason})") from None
    return [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _fields(path: str, lines: list[tuple[int, str]], count: int, what: str) -> list[list[str]]:
    rows = []
    for n, line in lines:
        parts = line.split()
        if len(parts) != count:
            raise IJBError(f"{path}:{n}: expected {count} fields ({what}), got {len(parts)}")
        rows.append(parts)
    return rows


def _column(path: str, rows: list, lines: list, col: int, dtype: type, what: str) -> np.ndarray:
    """Column ``col`` of ``rows`` as ``dtype``; a bad cell is an error naming its line."""
    cells = [r[col] for r in rows]
    try:
        return np.array(cells, dtype=np.str_).astype(dtype)
    except ValueError:
        for (n, _), cell in zip(lines, cells):
            try:
                dtype(cell)
            except ValueError:
                raise IJBError(f"{path}:{n}: {what} {cell!r} is not a number") from None
        raise  # pragma: no cover - astype failed on a cell that parses alone


def _read_landmarks(path: str) -> tuple[list[str], np.ndarray, np.ndarray, list]:
    lines = _lines(path)
    rows = _fields(path, lines, 12, "name, 5 landmarks as x y, detector score")
    values = np.stack(
        [_column(path, rows, lines, c, np.float32, "value") for c in range(1, 12)], axis=1
    )
    return [r[0] for r in rows], values[:, :10].reshape(-1, 5, 2), values[:, 10], lines


def _read_template_media(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    lines = _lines(path)
    rows = _fields(path, lines, 3, "name, template id, media id")
    templates = _column(path, rows, lines, 1, np.int64, "template id")
    medias = _column(path, rows, lines, 2, np.int64, "media id")
    return [r[0] for r in rows], templates, medias


def _read_pairs(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``[P, 2]`` template ids and ``[P]`` labels; millions of lines in a C-speed parse, with a
    line-by-line scan only to name a malformed line."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise IJBError(f"{path}: cannot read ({exc.strerror or exc})") from None
    values = None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a token that is not a number stops the parse
        try:
            values = np.fromstring(data, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning):
            values = None
    lines = sum(1 for line in data.splitlines() if line.strip()) if values is not None else -1
    if values is None or values.size != 3 * lines or not np.isin(values[2::3], (0, 1)).all():
        text = [(n, line.decode("utf-8", "replace")) for n, line in enumerate(data.splitlines(), 1)]
        text = [(n, line) for n, line in text if line.strip()]
        rows = _fields(path, text, 3, "template1, template2, label")
        _column(path, rows, text, 0, np.int64, "template id")
        _column(path, rows, text, 1, np.int64, "template id")
        label = _column(path, rows, text, 2, np.int64, "label")
        bad = np.flatnonzero(~np.isin(label, (0, 1)))
        if bad.size:
            n = text[bad[0]][0]
            raise IJBError(f"{path}:{n}: label must be 0 or 1, got {label[bad[0]]}")
        raise IJBError(f"{path}: cannot parse the pairs")  # pragma: no cover
    values = values.reshape(-1, 3)
    if values.shape[0] == 0:
        raise IJBError(f"{path}: no pairs")
    return values[:, :2].copy(), values[:, 2].astype(bool)


def _read_template_set(name: str, path: str) -> TemplateSet:
    lines = _lines(path)[1:]  # a header line first
    rows = []
    for n, line in lines:
        parts = line.split(",")
        if len(parts) < 2:
            raise IJBError(f"{path}:{n}: expected TEMPLATE_ID,SUBJECT_ID,... got {line.strip()!r}")
        rows.append([p.strip() for p in parts[:2]])
    if not rows:
        raise IJBError(f"{path}: no templates")
    templates = _column(path, rows, lines, 0, np.int64, "template id")
    subjects = _column(path, rows, lines, 1, np.int64, "subject id")
    uniq, first, inverse = np.unique(templates, return_index=True, return_inverse=True)
    subject_of = subjects[first]
    clash = np.flatnonzero(subject_of[inverse] != subjects)
    if clash.size:
        n = lines[clash[0]][0]
        raise IJBError(
            f"{path}:{n}: template {templates[clash[0]]} has subject {subjects[clash[0]]} here "
            f"and {subject_of[inverse[clash[0]]]} on an earlier line"
        )
    return TemplateSet(name, path, uniq, subject_of)


def is_ijb_spec(spec: str) -> bool:
    """Whether a target name means an IJB folder: ``IJBB:DIR`` / ``IJBC:DIR``, or a folder
    holding ``meta/``."""
    head, sep, _ = str(spec).partition(":")
    if sep and head.upper() in TARGETS:
        return True
    return os.path.isdir(os.path.join(str(spec), "meta"))


def read_meta_spec(spec: str) -> IJBMeta:
    """:func:`read_meta` of ``IJBB:DIR`` / ``IJBC:DIR``, or of ``DIR`` whose ``meta/`` holds the
    files of exactly one target.

    Raises:
        IJBError: ``DIR/meta`` holds both targets' files or neither's.
    """
    head, sep, rest = str(spec).partition(":")
    if sep and head.upper() in TARGETS:
        return read_meta(rest, head)
    found = [t for t in TARGETS if os.path.isfile(meta_files(spec, t)["landmarks"])]
    if len(found) != 1:
        what = "files of both IJBB and IJBC" if found else "no <t>_name_5pts_score.txt"
        raise IJBError(f"{spec}/meta: {what}; name the target as IJBB:{spec} or IJBC:{spec}")
    return read_meta(spec, found[0])


def read_meta(root: str, target: str) -> IJBMeta:
    """Reads an IJB target's meta files (see the module docstring for the layout).

    Raises:
        IJBError: unknown target, missing folder or file, a malformed line (named
            ``file:line``), landmarks and template files of different lengths or image names,
            a 1:N file set present only in part, a gallery with two templates for one subject.
    """
    files = meta_files(root, target)
    if not os.path.isdir(os.path.join(root, "meta")):
        raise IJBError(f"{root}: not an IJB folder (no meta/ inside; expected loose_crop/, meta/)")
    names, landmarks, scores, _ = _read_landmarks(files["landmarks"])
    names_t, templates, medias = _read_template_media(files["templates"])
    if len(names) != len(names_t):
        raise IJBError(
            f"{files['templates']}: {len(names_t)} rows but {files['landmarks']} has "
            f"{len(names)}; the two files list the same images in the same order"
        )
    if not names:
        raise IJBError(f"{files['landmarks']}: no images")
    for i, (a, b) in enumerate(zip(names, names_t)):
        if a != b:
            raise IJBError(
                f"{files['templates']}: image {i + 1} is {b!r} but {files['landmarks']} "
                f"has {a!r}; the two files list the same images in the same order"
            )
    pairs, labels = _read_pairs(files["pairs"])
    known = np.unique(templates)
    unknown = ~np.isin(pairs, known)
    if unknown.any():
        row = int(np.flatnonzero(unknown.any(axis=1))[0])
        tid = int(pairs[row][unknown[row]][0])
        raise IJBError(
            f"{files['pairs']}: pair {row + 1} names template {tid}, which has no image in "
            f"{files['templates']}"
        )
    meta = IJBMeta(target.upper(), root, names, landmarks, scores, templates, medias, pairs, labels)
    meta.files = {k: v for k, v in files.items() if k in ("landmarks", "templates", "pairs")}
    set_names = [k for k in files if k not in ("landmarks", "templates", "pairs")]
    present = [k for k in set_names if os.path.isfile(files[k])]
    if present and len(present) != len(set_names):
        missing = [files[k] for k in set_names if k not in present]
        raise IJBError(f"{missing[0]}: missing (1:N needs both galleries and the probe file)")
    if present:
        sets = [_read_template_set(k, files[k]) for k in set_names]
        for s in sets:
            gone = s.templates[~np.isin(s.templates, known)]
            if gone.size:
                raise IJBError(
                    f"{s.path}: template {int(gone[0])} has no image in {files['templates']}"
                )
        for g in sets[:-1]:
            subj, counts = np.unique(g.subjects, return_counts=True)
            if (counts > 1).any():
                raise IJBError(
                    f"{g.path}: subject {int(subj[counts > 1][0])} has several gallery "
                    "templates; the 1:N protocol has one per subject"
                )
        meta.galleries, meta.probes = sets[:-1], sets[-1]
        meta.files.update({k: files[k] for k in set_names})
    return meta


# --------------------------------------------------------------------------------------------
# Image and template features
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IJBSwitches:
    """InsightFace's three test-mode switches, with its defaults (its "N1D1F1")."""

    flip: bool = True
    """``use_flip_test``: image feature = f(crop) + f(mirrored crop) (else f(crop))."""
    norm_score: bool = True
    """``use_norm_score``: keep each image feature's norm as a quality weight (False:
    L2-normalise each image feature before pooling)."""
    detector_score: bool = True
    """``use_detector_score``: multiply each image feature by its faceness score."""


def image_features(
    raw: np.ndarray, face_scores: np.ndarray, switches: IJBSwitches = IJBSwitches()
) -> np.ndarray:
    """Per-image features from the two views, by the switches.

    Args:
        raw: ``[N, 2D]`` float32: feature of the aligned crop, then of its mirror.
        face_scores: ``[N]`` detector scores.
        switches: which of the three conventions apply.

    Returns:
        ``[N, D]`` float32.
    """
    raw = np.asarray(raw)
    if raw.ndim != 2 or raw.shape[1] % 2:
        raise ValueError(f"raw features must be [N, 2D], got {raw.shape}")
    d = raw.shape[1] // 2
    feats = raw[:, :d] + raw[:, d:] if switches.flip else raw[:, :d].copy()
    feats = feats.astype(np.float32, copy=False)
    if not switches.norm_score:
        norms = np.sqrt(np.einsum("ij,ij->i", feats, feats))
        feats /= np.where(norms > 0, norms, 1)[:, None]
    if switches.detector_score:
        feats *= np.asarray(face_scores, dtype=np.float32)[:, None]
    return feats


def template_features(
    features: np.ndarray, templates: np.ndarray, medias: np.ndarray, chunk_rows: int = 1 << 16
) -> tuple[np.ndarray, np.ndarray]:
    """Media pooling, then template pooling, then L2 normalisation, without a loop over
    templates.

    A template's feature is the sum over its media of the mean of that media's images, i.e.
    the sum of its images weighted by one over the size of their media group (a media is
    grouped within a template). Images are sorted by template once and each block of whole
    templates is summed with ``np.add.reduceat`` in the features' precision (float32, as
    InsightFace's media means and sums); the sums are normalised in float64.

    Args:
        features: ``[N, D]`` image features (:func:`image_features`).
        templates: ``[N]`` template id of each image.
        medias: ``[N]`` media id of each image.
        chunk_rows: images per block (bounds the gathered copy).

    Returns:
        ``([T] template ids, increasing; [T, D] float64 unit rows)`` (a zero sum stays zero).
    """
    n, d = features.shape
    ids, t_idx = np.unique(templates, return_inverse=True)
    t_idx = t_idx.reshape(-1)
    _, m_idx = np.unique(medias, return_inverse=True)
    group = t_idx.astype(np.int64) * (int(m_idx.max()) + 1) + m_idx.reshape(-1)
    _, g_idx, g_count = np.unique(group, return_inverse=True, return_counts=True)
    weight = (1.0 / g_count[g_idx.reshape(-1)]).astype(features.dtype)
    order = np.argsort(t_idx, kind="stable")
    starts = np.flatnonzero(np.r_[True, t_idx[order][1:] != t_idx[order][:-1]])
    out = np.empty((ids.size, d), dtype=np.float64)
    first = 0
    while first < ids.size:
        # whole templates, about chunk_rows images (at least one template)
        last = max(int(np.searchsorted(starts, starts[first] + chunk_rows, "right")), first + 1)
        r0 = starts[first]
        r1 = starts[last] if last < ids.size else n
        rows = order[r0:r1]
        block = features[rows]
        block *= weight[rows, None]
        out[first:last] = np.add.reduceat(block, starts[first:last] - r0, axis=0)
        first = last
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))
    out /= np.where(norms > 0, norms, 1.0)[:, None]
    return ids, out


def template_rows(ids: np.ndarray, wanted: np.ndarray, where: str) -> np.ndarray:
    """Rows of ``wanted`` template ids in ``ids`` (increasing).

    Raises:
        IJBError: a template of ``wanted`` is not in ``ids`` (names ``where``).
    """
    pos = np.searchsorted(ids, wanted)
    pos_c = np.minimum(pos, ids.size - 1)
    bad = ids[pos_c] != wanted
    if bad.any():
        raise IJBError(f"{where}: template {int(np.asarray(wanted)[bad][0])} has no images")
    return pos_c


def pair_scores(
    feats: np.ndarray,
    rows1: np.ndarray,
    rows2: np.ndarray,
    block_pairs: int = 1 << 20,
    max_dense: int = 1 << 25,
    dense_gain: int = 32,
) -> np.ndarray:
    """Cosine score of every pair of template rows, ``feats[rows1[i]] . feats[rows2[i]]``.

    Pairs are sorted by their first template and taken in blocks. IJB protocols compare a
    few thousand gallery templates with many probe templates, so a block's pairs usually
    fill a good part of the matrix (its first templates x its second templates): that matrix
    is one BLAS product and the scores are read from it. A sparse block (matrix more than
    ``dense_gain`` times the pairs, or over ``max_dense`` entries) takes row-wise dot
    products of gathered rows instead. Both give the same numbers up to float rounding.

    Args:
        feats: ``[T, D]`` unit template features.
        rows1, rows2: ``[P]`` row indices into ``feats``.

    Returns:
        ``[P]`` float64 in the pairs' order.
    """
    feats = np.asarray(feats)
    rows1 = np.asarray(rows1, dtype=np.int64)
    rows2 = np.asarray(rows2, dtype=np.int64)
    out = np.empty(rows1.size, dtype=np.float64)
    order = np.argsort(rows1, kind="stable")
    seen = np.zeros(feats.shape[0], dtype=bool)
    for r0 in range(0, rows1.size, block_pairs):
        idx = order[r0 : r0 + block_pairs]
        a, b = rows1[idx], rows2[idx]  # a is sorted
        ua_start = np.flatnonzero(np.r_[True, a[1:] != a[:-1]])
        ua = a[ua_start]
        seen[:] = False
        seen[b] = True
        ub = np.flatnonzero(seen)
        entries = ua.size * ub.size
        if entries <= max_dense and entries <= dense_gain * idx.size:
            a_local = np.repeat(np.arange(ua.size), np.diff(np.r_[ua_start, idx.size]))
            b_local = (np.cumsum(seen) - 1)[b]
            product = feats[ua] @ feats[ub].T
            out[idx] = product[a_local, b_local]
        else:
            for s in range(0, idx.size, 4096):
                x, y = feats[a[s : s + 4096]], feats[b[s : s + 4096]]
                out[idx[s : s + 4096]] = np.einsum("ij,ij->i", x, y)
    return out


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def verification_metrics(
    scores: np.ndarray, labels: np.ndarray, fars: Sequence[float] = FARS
) -> dict[str, float]:
    """``tar@far=<f>`` for each FAR and ``auc``, read as InsightFace reads them."""
    fpr, tpr, _ = metrics.roc_curve_reduced(scores, labels)
    tars = metrics.tar_at_nearest_far(fpr, tpr, fars)
    out = {f"tar@far={metrics.far_label(f)}": t for f, t in zip(fars, tars)}
    out["auc"] = metrics.trapezoid_auc(fpr, tpr)
    return out


@dataclass
class GalleryResult:
    """1:N figures of one gallery.

    Attributes:
        name: gallery name.
        num_gallery: gallery templates.
        num_mated: probes whose subject is in the gallery.
        num_nonmated: the other probes (open-set).
        hits: rank -> mated probes whose mate is within that rank.
        tpir: FPIR label -> TPIR (NaN without mated or non-mated probes).
        thresholds: FPIR label -> score threshold.
    """

    name: str
    num_gallery: int
    num_mated: int
    num_nonmated: int
    hits: dict[int, int]
    tpir: dict[str, float]
    thresholds: dict[str, float]


def identify(
    probe_feats: np.ndarray,
    probe_subjects: np.ndarray,
    gallery_feats: np.ndarray,
    gallery_subjects: np.ndarray,
    name: str = "gallery",
) -> GalleryResult:
    """Open-set 1:N search of the probes in one gallery (one template per subject).

    Rank of a mated probe = number of gallery templates scoring strictly higher than its mate
    (exact ties count in the probe's favour). A mated probe is identified at FPIR f when it
    ranks first, its mate scores strictly above every other gallery template, and strictly
    above the threshold from the non-mated probes' best scores.

    Args:
        probe_feats: ``[Q, D]`` unit features. probe_subjects: ``[Q]``.
        gallery_feats: ``[G, D]`` unit features. gallery_subjects: ``[G]`` distinct.
    """
    sim = np.asarray(probe_feats, dtype=np.float64) @ np.asarray(gallery_feats, np.float64).T
    g_order = np.argsort(gallery_subjects, kind="stable")
    g_sorted = np.asarray(gallery_subjects)[g_order]
    pos = np.minimum(np.searchsorted(g_sorted, probe_subjects), g_sorted.size - 1)
    mated = g_sorted[pos] == probe_subjects
    mate = g_order[pos[mated]]
    sim_m = sim[mated]
    rows = np.arange(sim_m.shape[0])
    pos_sims = sim_m[rows, mate]
    rank = (sim_m > pos_sims[:, None]).sum(axis=1)
    hits = {k: int((rank < k).sum()) for k in RANKS}
    others = sim_m.copy()
    others[rows, mate] = -np.inf
    first = pos_sims > others.max(axis=1, initial=-np.inf)
    best_nonmated = np.sort(sim[~mated].max(axis=1, initial=-np.inf))[::-1]
    tpir, thresholds = {}, {}
    for label, fpir in FPIRS:
        if best_nonmated.size == 0 or pos_sims.size == 0:
            tpir[label], thresholds[label] = float("nan"), float("nan")
            continue
        thr = float(best_nonmated[max(int(best_nonmated.size * fpir) - 1, 0)])
        thresholds[label] = thr
        tpir[label] = float(np.logical_and(first, pos_sims > thr).sum() / pos_sims.size)
    return GalleryResult(
        name, int(gallery_feats.shape[0]), int(mated.sum()), int((~mated).sum()), hits, tpir,
        thresholds,
    )  # fmt: skip


def identification_metrics(galleries: Sequence[GalleryResult], num_probes: int) -> dict:
    """``rank<k>`` (hits of every gallery over ``num_probes``) and ``tpir@fpir=<f>`` (mean
    over galleries), as ``ijb_evals.py`` combines its two galleries."""
    out: dict[str, float] = {}
    for k in RANKS:
        out[f"rank{k}"] = sum(g.hits[k] for g in galleries) / max(num_probes, 1)
    for label, _ in FPIRS:
        out[f"tpir@fpir={label}"] = float(np.mean([g.tpir[label] for g in galleries]))
    return out


@dataclass
class IJBResult:
    """Everything measured on one IJB target.

    Attributes:
        metrics: flat ``metric -> value`` (the report's keys).
        scores: ``[P]`` float64 pair scores, in the pair file's order.
        labels: ``[P]`` bool.
        galleries: per-gallery 1:N figures (empty without the 1:N files).
    """

    metrics: dict[str, float]
    scores: np.ndarray = field(repr=False)
    labels: np.ndarray = field(repr=False)
    galleries: list[GalleryResult] = field(default_factory=list)

    def details(self) -> dict[str, Any]:
        """JSON-ready per-gallery figures."""
        return {
            g.name: {
                "num_gallery": g.num_gallery,
                "num_mated": g.num_mated,
                "num_nonmated": g.num_nonmated,
                **{f"rank{k}": v / max(g.num_mated, 1) for k, v in g.hits.items()},
                **{f"tpir@fpir={k}": v for k, v in g.tpir.items()},
                "thresholds": g.thresholds,
            }
            for g in self.galleries
        }


def evaluate(meta: IJBMeta, raw: np.ndarray, switches: IJBSwitches = IJBSwitches()) -> IJBResult:
    """1:1 and 1:N figures of one target from its raw ``[N, 2D]`` features (no model)."""
    if raw.shape[0] != meta.num_images:
        raise ValueError(f"{raw.shape[0]} feature rows for {meta.num_images} images")
    feats = image_features(raw, meta.face_scores, switches)
    ids, tfeats = template_features(feats, meta.templates, meta.medias)
    del feats
    where = meta.files.get("pairs", "pairs")
    rows1 = template_rows(ids, meta.pairs[:, 0], where)
    rows2 = template_rows(ids, meta.pairs[:, 1], where)
    scores = pair_scores(tfeats, rows1, rows2)
    out = verification_metrics(scores, meta.labels)
    galleries = []
    if meta.probes is not None:
        probe_rows = template_rows(ids, meta.probes.templates, meta.probes.path)
        for g in meta.galleries:
            g_rows = template_rows(ids, g.templates, g.path)
            galleries.append(
                identify(
                    tfeats[probe_rows], meta.probes.subjects, tfeats[g_rows], g.subjects, g.name
                )
            )
        out.update(identification_metrics(galleries, meta.probes.templates.size))
    out.update(
        {
            "num_images": float(meta.num_images),
            "num_templates": float(ids.size),
            "num_pairs": float(meta.num_pairs),
        }
    )
    return IJBResult(out, scores, meta.labels, galleries)


# --------------------------------------------------------------------------------------------
# Raw feature cache
# --------------------------------------------------------------------------------------------


def file_digest(path: str) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A digest of everything the raw features depend on (weights, network, image list,
    input preparation): a cache written under another key is stale."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_paths(out_dir: str, target: str) -> tuple[str, str]:
    """``(<out>/<t>_features.npy, <out>/<t>_features.json)``."""
    prefix = TARGETS[target.upper()][0]
    base = os.path.join(out_dir, f"{prefix}_features")
    return base + ".npy", base + ".json"


def load_cached_features(out_dir: str, target: str, key: str, num_images: int):
    """The cached ``[N, 2D]`` float32 features when their key and size match, else None."""
    npy, meta = cache_paths(out_dir, target)
    try:
        with open(meta, encoding="utf-8") as f:
            info = json.load(f)
        if info.get("key") != key or info.get("num_images") != num_images:
            return None
        raw = np.load(npy, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if raw.shape[0] != num_images or raw.ndim != 2:
        return None
    return np.asarray(raw)


def save_cached_features(
    out_dir: str, target: str, key: str, raw: np.ndarray, parts: dict[str, Any]
) -> str:
    """Writes the features (``.npy``) and then their key (``.json``); returns the ``.npy`` path."""
    os.makedirs(out_dir, exist_ok=True)
    npy, meta = cache_paths(out_dir, target)
    if os.path.exists(meta):
        os.remove(meta)  # the old key must not vouch for a half-written array
    tmp = npy + ".tmp.npy"
    np.save(tmp, np.asarray(raw, dtype=np.float32))
    os.replace(tmp, npy)
    with open(meta, "w", encoding="utf-8") as f:
        json.dump({"key": key, "num_images": int(raw.shape[0]), "parts": parts}, f, indent=2)
        f.write("\n")
    return npy
