"""IJB-B / IJB-C evaluation (issue 14, points 1-3, 6, 7).

* end to end on an IJB-layout folder built here from real photos (YuNet landmarks, several
  templates per person, media, 1:1 pairs, two galleries and mixed probes), scored by the
  released MobileFaceNet imported into the registered ``mobilefacenet``;
* the module against a plain loop implementation written here from InsightFace's description;
* one test per convention that changes the numbers when broken;
* the feature cache and the meta-file errors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import sklearn.metrics

from eval import ijb, metrics
from tests.eval_helpers import tiny_backbone  # noqa: F401 - a fixture

ROOT = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("REALFACES", ROOT.parent / "shared" / "realfaces"))
YUNET = REAL / "models" / "face_detection_yunet.onnx"
MFN = REAL / "models" / "mobilefacenet_512.onnx"


# --------------------------------------------------------------------------------------------
# Writing an IJB layout
# --------------------------------------------------------------------------------------------


def write_layout(
    root: Path,
    prefix: str,
    names: list[str],
    landmarks: np.ndarray,
    scores: np.ndarray,
    templates: list[int],
    medias: list[int],
    pairs: list[tuple[int, int, int]],
    galleries: dict[str, list[tuple[int, int]]] | None = None,
    probes: list[tuple[int, int]] | None = None,
) -> Path:
    """Writes ``root/meta/<prefix>_*`` as InsightFace's IJB release lays them out."""
    meta = root / "meta"
    meta.mkdir(parents=True, exist_ok=True)
    (root / "loose_crop").mkdir(exist_ok=True)
    with open(meta / f"{prefix}_name_5pts_score.txt", "w") as f:
        for name, lmk, s in zip(names, landmarks, scores):
            f.write(" ".join([name, *(f"{v:.3f}" for v in np.ravel(lmk)), f"{s:.3f}"]) + "\n")
    with open(meta / f"{prefix}_face_tid_mid.txt", "w") as f:
        for name, t, m in zip(names, templates, medias):
            f.write(f"{name} {t} {m}\n")
    with open(meta / f"{prefix}_template_pair_label.txt", "w") as f:
        for a, b, y in pairs:
            f.write(f"{a} {b} {y}\n")
    if galleries is not None:
        sets = {f"gallery_{k}": v for k, v in galleries.items()} | {"probe_mixed": probes}
        for key, rows in sets.items():
            with open(meta / f"{prefix}_1N_{key}.csv", "w") as f:
                f.write("TEMPLATE_ID,SUBJECT_ID,FILENAME\n")
                for t, s in rows:
                    f.write(f"{t},{s},img/{t}.jpg\n")
                    f.write(f"{t},{s},img/{t}_b.jpg\n")  # one row per image, as IJB's csvs
    return root


def synthetic_layout(root: Path, seed: int = 0, dim: int = 6):
    """A small IJB-C-like set: 8 subjects, 3 templates each (gallery, two probes), media of
    1-4 frames, images shared between templates; returns (meta, raw features)."""
    rng = np.random.default_rng(seed)
    names, templates, medias = [], [], []
    centres = rng.standard_normal((8, dim))
    feats = []
    tid, mid = 100, 5000
    subject_of = {}
    for s in range(8):
        for k in range(3):
            tid += 1
            subject_of[tid] = s
            for _ in range(int(rng.integers(1, 4))):  # media per template
                mid += 1
                for _ in range(int(rng.integers(1, 5))):  # frames per media
                    names.append(f"{len(names)}.jpg")
                    templates.append(tid)
                    medias.append(mid if k else mid % 7)  # gallery media ids repeat across
                    feats.append(centres[s] + 0.8 * rng.standard_normal(dim))
    n = len(names)
    # a repeated image: the first image again, in the last template
    names.append(names[0])
    templates.append(tid)
    medias.append(mid + 1)
    feats.append(feats[0])
    n += 1
    crop = np.asarray(feats, dtype=np.float32) * rng.uniform(0.5, 3.0, (n, 1)).astype(np.float32)
    mirror = crop + 0.3 * rng.standard_normal(crop.shape).astype(np.float32)
    raw = np.concatenate([crop, mirror], axis=1)
    scores = np.round(rng.uniform(0.2, 1.0, n), 3)
    lmk = rng.uniform(0, 100, (n, 5, 2))
    tids = sorted(subject_of)
    pairs = [(a, b, int(subject_of[a] == subject_of[b])) for a in tids for b in tids if a < b]
    gallery = [t for t in tids if (t - 101) % 3 == 0]
    g1 = [(t, subject_of[t]) for t in gallery if subject_of[t] < 4]
    g2 = [(t, subject_of[t]) for t in gallery if 4 <= subject_of[t] < 7]  # subject 7: none
    probes = [(t, subject_of[t]) for t in tids if t not in gallery]
    write_layout(root, "ijbc", names, lmk, scores, templates, medias, pairs,
                 {"G1": g1, "G2": g2}, probes)  # fmt: skip
    return ijb.read_meta(str(root), "IJBC"), raw


# --------------------------------------------------------------------------------------------
# A plain loop implementation (the reference), written from InsightFace's description
# --------------------------------------------------------------------------------------------


def loop_scores(meta: ijb.IJBMeta, raw: np.ndarray, flip=True, norm=True, det=True):
    d = raw.shape[1] // 2
    feats = []
    for i in range(meta.num_images):
        f = raw[i, :d].astype(np.float64) + (raw[i, d:] if flip else 0)
        if not norm:
            f = f / np.linalg.norm(f)
        if det:
            f = f * float(meta.face_scores[i])
        feats.append(f)
    template_feats = {}
    for t in sorted(set(meta.templates.tolist())):
        by_media: dict[int, list] = {}
        for i in range(meta.num_images):
            if meta.templates[i] == t:
                by_media.setdefault(int(meta.medias[i]), []).append(feats[i])
        total = sum(np.mean(v, axis=0) for v in by_media.values())
        template_feats[t] = total / np.linalg.norm(total)
    scores = [float(template_feats[a] @ template_feats[b]) for a, b in meta.pairs.tolist()]
    return np.array(scores), template_feats


def loop_tar(scores, labels, fars):
    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores)
    auc = sklearn.metrics.auc(fpr, tpr)
    fpr, tpr = fpr[::-1], tpr[::-1]
    out = []
    for far in fars:
        best = min(range(len(fpr)), key=lambda k: (abs(fpr[k] - far), k))
        out.append(tpr[best])
    return out, auc


def loop_identify(probe_feats, probe_ids, gallery_feats, gallery_ids, fpirs):
    """ijb_evals.py's evaluation_1N, per probe."""
    top = {1: 0, 5: 0, 10: 0}
    pos, neg, non = [], [], []
    for q, qid in zip(probe_feats, probe_ids):
        sims = np.array([q @ g for g in gallery_feats])
        if qid in list(gallery_ids):
            mate = list(gallery_ids).index(qid)
            ranked = list(np.argsort(-sims, kind="stable"))
            for k in top:
                top[k] += mate in ranked[:k]
            pos.append(sims[mate])
            neg.append(max(s for j, s in enumerate(sims) if j != mate))
        else:
            non.append(max(sims))
    non = sorted(non, reverse=True)
    tpir = []
    for f in fpirs:
        thr = non[max(int(len(non) * f) - 1, 0)]
        tpir.append(sum(p > n and p > thr for p, n in zip(pos, neg)) / len(pos))
    return top, tpir, len(pos)


# --------------------------------------------------------------------------------------------
# The module equals the loops
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flip,norm,det", [(True, True, True), (False, False, True),
                                           (True, False, False), (False, True, False)])  # fmt: skip
def test_scores_tar_and_identification_equal_the_loop_reference(tmp_path, flip, norm, det):
    meta, raw = synthetic_layout(tmp_path)
    sw = ijb.IJBSwitches(flip=flip, norm_score=norm, detector_score=det)
    res = ijb.evaluate(meta, raw, sw)
    ref_scores, tfeats = loop_scores(meta, raw, flip, norm, det)
    np.testing.assert_allclose(res.scores, ref_scores, rtol=0, atol=1e-6)
    tars, auc = loop_tar(ref_scores, meta.labels, ijb.FARS)
    for far, tar in zip(ijb.FARS, tars):
        assert res.metrics[f"tar@far={metrics.far_label(far)}"] == pytest.approx(tar, abs=1e-12)
    assert res.metrics["auc"] == pytest.approx(auc, abs=1e-12)
    # 1:N, per gallery, then combined as ijb_evals.py does
    probe_f = [tfeats[t] for t in meta.probes.templates.tolist()]
    hits = {1: 0, 5: 0, 10: 0}
    tpirs = []
    for g in meta.galleries:
        gal_f = [tfeats[t] for t in g.templates.tolist()]
        top, tpir, _ = loop_identify(
            probe_f, meta.probes.subjects, gal_f, g.subjects, [f for _, f in ijb.FPIRS]
        )
        for k in hits:
            hits[k] += top[k]
        tpirs.append(tpir)
    num_probes = len(meta.probes.templates)
    for k in (1, 5, 10):
        assert res.metrics[f"rank{k}"] == pytest.approx(hits[k] / num_probes)
    for j, (label, _) in enumerate(ijb.FPIRS):
        assert res.metrics[f"tpir@fpir={label}"] == pytest.approx(np.mean([t[j] for t in tpirs]))
    assert res.metrics["num_images"] == meta.num_images
    assert res.metrics["num_templates"] == len(tfeats)
    assert res.metrics["num_pairs"] == len(ref_scores)


def test_blocked_pair_scores_equal_row_wise_dots_on_both_paths():
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((50, 16))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    r1, r2 = rng.integers(0, 50, 3000), rng.integers(0, 50, 3000)
    want = np.einsum("ij,ij->i", feats[r1], feats[r2])
    dense = ijb.pair_scores(feats, r1, r2, block_pairs=700)
    sparse = ijb.pair_scores(feats, r1, r2, block_pairs=700, dense_gain=0)
    np.testing.assert_allclose(dense, want, atol=1e-12)
    np.testing.assert_allclose(sparse, want, atol=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_reduced_roc_is_sklearns_default_roc(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.standard_normal(3000), 1)  # many ties and collinear runs
    labels = rng.random(3000) < 0.3
    fpr, tpr, thr = metrics.roc_curve_reduced(scores, labels)
    want_fpr, want_tpr, want_thr = sklearn.metrics.roc_curve(labels, scores)
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)
    np.testing.assert_array_equal(thr[1:], want_thr[1:])


# --------------------------------------------------------------------------------------------
# One test per convention
# --------------------------------------------------------------------------------------------


def _one_template(vectors, scores, medias, switches):
    raw = np.asarray(vectors, dtype=np.float32)
    n = len(raw)
    ids, feats = ijb.template_features(
        ijb.image_features(raw, np.asarray(scores, np.float32), switches),
        np.zeros(n, dtype=np.int64),
        np.asarray(medias),
    )
    return feats[0]


def _unit(v):
    v = np.asarray(v, dtype=np.float64)
    return v / np.linalg.norm(v)


def test_flip_adds_the_mirror_feature():
    # image = [crop | mirror]; with flip the feature is crop + mirror
    raw = [[1.0, 0.0, 0.0, 3.0]]
    on = _one_template(raw, [1.0], [0], ijb.IJBSwitches())
    off = _one_template(raw, [1.0], [0], ijb.IJBSwitches(flip=False))
    np.testing.assert_allclose(on, _unit([1, 3]), atol=1e-7)
    np.testing.assert_allclose(off, _unit([1, 0]), atol=1e-7)


def test_norm_score_keeps_norms_unless_switched_off():
    raw = [[10.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]  # two photos, one 10x the norm
    kept = _one_template(raw, [1, 1], [0, 1], ijb.IJBSwitches())
    normed = _one_template(raw, [1, 1], [0, 1], ijb.IJBSwitches(norm_score=False))
    np.testing.assert_allclose(kept, _unit([10, 1]), atol=1e-7)
    np.testing.assert_allclose(normed, _unit([1, 1]), atol=1e-7)


def test_detector_score_weights_each_image():
    raw = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]
    weighted = _one_template(raw, [1.0, 0.25], [0, 1], ijb.IJBSwitches())
    plain = _one_template(raw, [1.0, 0.25], [0, 1], ijb.IJBSwitches(detector_score=False))
    np.testing.assert_allclose(weighted, _unit([1, 0.25]), atol=1e-7)
    np.testing.assert_allclose(plain, _unit([1, 1]), atol=1e-7)


def test_media_are_averaged_before_the_template_sum():
    # three frames of one video and one photo: the video counts once, not three times
    raw = [[1.0, 0, 0, 0]] * 3 + [[0, 1.0, 0, 0]]
    got = _one_template(raw, [1] * 4, [7, 7, 7, 8], ijb.IJBSwitches())
    np.testing.assert_allclose(got, _unit([1, 1]), atol=1e-7)
    flat = _unit([3, 1])
    assert np.abs(got - flat).max() > 0.1


def test_same_media_id_in_two_templates_is_two_media():
    raw = np.array([[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]], np.float32)
    feats = ijb.image_features(raw, np.ones(3, np.float32))
    ids, tf = ijb.template_features(feats, np.array([1, 2, 2]), np.array([5, 5, 6]))
    np.testing.assert_allclose(tf[1], _unit([1, 1]), atol=1e-7)


def test_tar_is_read_at_the_nearest_fpr_point_not_at_most_the_far():
    # 19 impostors: the ROC point nearest FAR 0.1 has FPR 2/19 = 0.105, above the target
    impostors = np.r_[0.9, 0.5, np.linspace(0.2, 0.0, 17)]
    genuine = np.array([0.95, 0.45, 0.44, 0.43])
    scores = np.r_[genuine, impostors]
    labels = np.r_[np.ones(4, bool), np.zeros(19, bool)]
    got = ijb.verification_metrics(scores, labels, fars=(0.1,))["tar@far=1e-1"]
    assert got == pytest.approx(1.0)  # all four genuine pairs score above the 2nd impostor
    at_most = metrics.tar_at_far(scores, labels, (0.1,))[0].tar
    assert at_most == pytest.approx(0.25)  # the "FPR <= 0.1" rule stops at FPR 1/19
    fpr, tpr, _ = sklearn.metrics.roc_curve(labels, scores)
    assert float(np.interp(0.1, fpr, tpr)) == pytest.approx(0.25)  # nor is it interpolated


def test_identification_averages_the_galleries_tpir_and_pools_their_ranks():
    # gallery A: two subjects, both probes of A found; gallery B: a probe ranked second
    e = np.eye(4)
    probes = np.stack([e[0], e[1], _unit([0, 0, 0.9, 1.0]), e[3]])
    subjects = np.array([0, 1, 2, 3])
    ga = ijb.identify(probes, subjects, np.stack([e[0], e[1]]), np.array([0, 1]), "A")
    gb = ijb.identify(probes, subjects, np.stack([e[2], e[3]]), np.array([2, 3]), "B")
    assert (ga.num_mated, ga.num_nonmated, gb.num_mated) == (2, 2, 2)
    assert ga.hits[1] == 2 and gb.hits[1] == 1
    out = ijb.identification_metrics([ga, gb], num_probes=4)
    assert out["rank1"] == pytest.approx(3 / 4)  # hits of both galleries over all probes
    assert out["rank5"] == pytest.approx(1.0)
    label = "1e-1"
    assert out[f"tpir@fpir={label}"] == pytest.approx((ga.tpir[label] + gb.tpir[label]) / 2)
    assert ga.tpir[label] != gb.tpir[label]


def test_open_set_probes_set_the_fpir_threshold():
    e = np.eye(3)
    gallery, g_subj = np.stack([e[0], e[1]]), np.array([0, 1])
    mated = np.stack([_unit([1, 0.1, 0]), _unit([0.5, 1, 0])])
    # a probe whose subject has no gallery template, close to subject 0
    stranger = _unit([1, 0, 0.3])
    alone = ijb.identify(mated, np.array([0, 1]), gallery, g_subj)
    assert alone.num_nonmated == 0 and np.isnan(alone.tpir["1e-1"])
    both = ijb.identify(np.vstack([mated, stranger]), np.array([0, 1, 9]), gallery, g_subj)
    assert both.num_nonmated == 1 and both.num_mated == 2
    assert both.thresholds["1e-1"] == pytest.approx(stranger @ e[0])
    # only the mate scoring above the stranger's best counts
    assert both.tpir["1e-1"] == pytest.approx(0.5)


# --------------------------------------------------------------------------------------------
# Meta files: reading and errors
# --------------------------------------------------------------------------------------------


def test_read_meta_reads_the_layout(tmp_path):
    meta, raw = synthetic_layout(tmp_path)
    assert meta.num_images == raw.shape[0]
    assert meta.landmarks.shape == (meta.num_images, 5, 2)
    assert [g.name for g in meta.galleries] == ["G1", "G2"]
    assert meta.probes.templates.size == 16
    assert meta.labels.sum() == 8 * 3  # three pairs of templates per subject
    ijbb = tmp_path / "b"
    write_layout(ijbb, "ijbb", ["1.jpg"], np.zeros((1, 5, 2)), [0.9], [1], [3], [(1, 1, 1)])
    b = ijb.read_meta(str(ijbb), "ijbb")
    assert b.target == "IJBB" and b.probes is None and b.galleries == []


def _small(tmp_path: Path, **kw) -> Path:
    args = dict(
        names=["1.jpg", "2.jpg", "3.jpg"], landmarks=np.zeros((3, 5, 2)), scores=[0.9] * 3,
        templates=[1, 1, 2], medias=[10, 11, 12], pairs=[(1, 2, 0), (1, 1, 1)],
    )  # fmt: skip
    args.update(kw)
    return write_layout(tmp_path, "ijbc", **args)


def _edit(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line - 1] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "file,line,text,message",
    [
        ("name_5pts_score.txt", 2, "2.jpg 1 2 3", r"ijbc_name_5pts_score.txt:2: expected 12"),
        ("name_5pts_score.txt", 3, "3.jpg 1 2 3 4 5 6 7 8 9 x 1", r"5pts_score.txt:3: value 'x'"),
        ("face_tid_mid.txt", 2, "2.jpg one 11", r"ijbc_face_tid_mid.txt:2: template id 'one'"),
        ("face_tid_mid.txt", 3, "9.jpg 2 12", r"tid_mid.txt: image 3 is '9.jpg' but .*5pts"),
        ("template_pair_label.txt", 2, "1 1 7", r"pair_label.txt:2: label must be 0 or 1"),
        ("template_pair_label.txt", 1, "1 2", r"pair_label.txt:1: expected 3 fields"),
        ("template_pair_label.txt", 2, "1 x 1", r"pair_label.txt:2: template id 'x'"),
        ("template_pair_label.txt", 2, "1 5 1", r"pair 2 names template 5, which has no image"),
    ],
)
def test_malformed_meta_is_one_line_naming_file_and_line(tmp_path, file, line, text, message):
    root = _small(tmp_path)
    _edit(root / "meta" / f"ijbc_{file}", line, text)
    with pytest.raises(ijb.IJBError, match=message) as err:
        ijb.read_meta(str(root), "IJBC")
    assert "\n" not in str(err.value)


def test_row_count_mismatch_unknown_target_and_partial_1n(tmp_path):
    root = _small(tmp_path)
    tid = root / "meta" / "ijbc_face_tid_mid.txt"
    tid.write_text("".join(tid.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(ijb.IJBError, match=r"tid_mid.txt: 2 rows but .*5pts_score.txt has 3"):
        ijb.read_meta(str(root), "IJBC")
    with pytest.raises(ijb.IJBError, match=r"unknown IJB target 'IJBX'.*IJBB"):
        ijb.read_meta(str(root), "IJBX")
    root2 = _small(tmp_path / "two", galleries={"G1": [(1, 0)], "G2": [(2, 1)]}, probes=[(2, 1)])
    (root2 / "meta" / "ijbc_1N_gallery_G2.csv").unlink()
    with pytest.raises(ijb.IJBError, match=r"ijbc_1N_gallery_G2.csv: missing"):
        ijb.read_meta(str(root2), "IJBC")
    with pytest.raises(ijb.IJBError, match=r"no meta/ inside"):
        ijb.read_meta(str(tmp_path / "nowhere"), "IJBC")


def test_gallery_with_two_templates_of_one_subject_is_refused(tmp_path):
    root = _small(tmp_path, galleries={"G1": [(1, 0), (2, 0)], "G2": [(2, 1)]}, probes=[(2, 1)])
    with pytest.raises(ijb.IJBError, match=r"G1.csv: subject 0 has several gallery templates"):
        ijb.read_meta(str(root), "IJBC")


# --------------------------------------------------------------------------------------------
# End to end on real faces, with the feature cache
# --------------------------------------------------------------------------------------------


def _real_layout(root: Path) -> tuple[Path, dict]:
    """loose_crop/ + meta/ from the real photos: per person a gallery template (first half of
    the photos, the first two as one "video" media), a probe template (the rest) and, for
    people with 5+ photos, a second probe template reusing photos of both halves."""
    import cv2

    from dist_train.data.align import YuNetDetector, choose_face

    detector = YuNetDetector(YUNET)
    people = sorted(p for p in (REAL / "photos").iterdir() if p.is_dir())
    names, lmks, scores, templates, medias = [], [], [], [], []
    subject_of, kind_of = {}, {}
    tid, mid = 0, 0
    for s, person in enumerate(people):
        found = []
        for photo in sorted(person.glob("*.jpg")):
            img = cv2.imread(str(photo))
            faces = detector.detect(img)
            if not faces:
                continue
            face = faces[choose_face(faces, img.shape, "largest")]
            name = f"{person.name}_{photo.name}"
            (root / "loose_crop").mkdir(parents=True, exist_ok=True)
            os.symlink(photo, root / "loose_crop" / name)
            found.append((name, face.landmarks, face.score))
        half = (len(found) + 1) // 2
        groups = [("gallery", found[:half]), ("probe", found[half:])]
        if len(found) >= 5:
            groups.append(("probe", [found[0], found[-1]]))
        for kind, members in groups:
            if not members:
                continue
            tid += 1
            subject_of[tid], kind_of[tid] = s, kind
            for j, (name, lmk, score) in enumerate(members):
                if not (kind == "gallery" and j == 1):  # photos 0 and 1: one media
                    mid += 1
                names.append(name)
                lmks.append(lmk)
                scores.append(score)
                templates.append(tid)
                medias.append(mid)
    gal = [t for t in subject_of if kind_of[t] == "gallery"]
    pro = [t for t in subject_of if kind_of[t] == "probe"]
    pairs = [(a, b, int(subject_of[a] == subject_of[b])) for a in gal for b in pro]
    num = len(people)
    g1 = [(t, subject_of[t]) for t in gal if subject_of[t] < num // 2]
    g2 = [(t, subject_of[t]) for t in gal if num // 2 <= subject_of[t] < num - 1]
    probes = [(t, subject_of[t]) for t in pro]  # the last person: in no gallery
    write_layout(root, "ijbc", names, np.array(lmks), scores, templates, medias, pairs,
                 {"G1": g1, "G2": g2}, probes)  # fmt: skip
    return root, {"people": num, "images": len(names), "templates": tid, "pairs": len(pairs)}


@pytest.fixture
def flushed_denormals():
    """The imported weights give denormal activations, which make CPU convolutions ~8x slower;
    flushing them keeps a test short (the figures do not change at the printed precision)."""
    import torch

    flush = torch.set_flush_denormal(True)
    yield
    if flush:
        torch.set_flush_denormal(False)


@pytest.mark.slow
@pytest.mark.skipif(not MFN.is_file(), reason=f"real face data not found at {REAL}")
@pytest.mark.usefixtures("flushed_denormals")
def test_real_faces_end_to_end_with_cache_reuse(tmp_path):
    from backbones.importers import import_weights, write_weights
    from eval.cli import main as eval_main
    from eval.runner import extract_ijb_features

    root, info = _real_layout(tmp_path / "IJBC")

    weights = write_weights(
        import_weights(MFN, "mobilefacenet").model, tmp_path / "mfn.safetensors"
    )
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return extract_ijb_features(*args, **kwargs)

    out = tmp_path / "out"
    base = ["--weights", str(weights), "--network", "mobilefacenet", "--ijb", str(root),
            "--ijb-target", "IJBC", "--out", str(out), "--batch-size", "16"]  # fmt: skip
    first = eval_main(base, extract_ijb=counting)["IJBC"]
    assert len(calls) == 1
    report = json.loads((out / "report.json").read_text())
    m = report["targets"]["IJBC"]["metrics"]
    keys = [f"tar@far=1e-{k}" for k in range(1, 7)] + ["auc", "rank1", "rank5", "rank10"]
    keys += [f"tpir@fpir=1e-{k}" for k in range(1, 5)]
    keys += ["num_images", "num_templates", "num_pairs"]
    assert set(keys) <= set(m)
    assert (m["num_images"], m["num_templates"], m["num_pairs"]) == (
        info["images"], info["templates"], info["pairs"],
    )  # fmt: skip
    scores = np.load(out / "ijbc_scores.npy")
    np.testing.assert_array_equal(scores, first.scores)
    labels = first.issame
    genuine, impostor = scores[labels], scores[~labels]
    print(
        f"\nreal IJB layout {info}: genuine mean {genuine.mean():.3f} (min {genuine.min():.3f}),"
        f" impostor mean {impostor.mean():.3f} (max {impostor.max():.3f}), AUC {m['auc']:.4f},"
        f" rank1 {m['rank1']:.3f}, TPIR@1e-1 {m['tpir@fpir=1e-1']:.3f}"
    )
    assert genuine.mean() > impostor.mean() + 0.3
    assert m["auc"] > 0.95
    assert np.median(genuine) > np.quantile(impostor, 0.99)
    assert (out / "IJBC_roc.png").is_file()
    assert report["targets"]["IJBC"]["ijb"]["features"] == "extracted"
    # another switch: rescored from the cache, no extraction, other numbers
    second = eval_main([*base, "--ijb-no-detector-score"], extract_ijb=counting)["IJBC"]
    assert len(calls) == 1
    report = json.loads((out / "report.json").read_text())
    assert report["targets"]["IJBC"]["ijb"]["features"] == "cache"
    assert report["targets"]["IJBC"]["ijb"]["detector_score"] is False
    assert not np.allclose(second.scores, first.scores)
    # the flip switch rescored too; it equals scoring the cached features directly
    cached = np.load(out / "ijbc_features.npy")
    third = eval_main([*base, "--no-flip"], extract_ijb=counting)["IJBC"]
    assert len(calls) == 1
    meta = ijb.read_meta(str(root), "IJBC")
    direct = ijb.evaluate(meta, cached, ijb.IJBSwitches(flip=False))
    np.testing.assert_array_equal(third.scores, direct.scores)
    # another input preparation is another key: extracted again
    eval_main([*base, "--mean", "0.4"], extract_ijb=counting)
    assert len(calls) == 2


@pytest.mark.skipif(not MFN.is_file(), reason=f"real face data not found at {REAL}")
def test_crop_is_aligned_by_its_landmarks_and_the_mirror_is_a_row_of_its_own(tmp_path):
    """Two images through extract_ijb_features: rows are [f(crop) | f(mirror)], the crop the
    ArcFace-template warp of the landmarks' image."""
    import cv2
    import torch

    from dist_train.data.align import YuNetDetector, align_face
    from eval.runner import extract_ijb_features, ijb_crop

    photo = sorted((REAL / "photos" / "p01").glob("*.jpg"))[0]
    img = cv2.imread(str(photo))
    face = YuNetDetector(YUNET).detect(img)[0]
    root = tmp_path / "IJBC"
    (root / "loose_crop").mkdir(parents=True)
    os.symlink(photo, root / "loose_crop" / "a.jpg")
    write_layout(root, "ijbc", ["a.jpg", "a.jpg"], np.stack([face.landmarks] * 2),
                 [0.9, 0.9], [1, 2], [1, 2], [(1, 2, 1)])  # fmt: skip
    meta = ijb.read_meta(str(root), "IJBC")
    crop = ijb_crop(meta, 0)
    want = align_face(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), meta.landmarks[0])
    assert np.abs(crop.astype(int) - want.astype(int)).max() <= 1  # JPEG decoders may differ

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.clone())
            return x.mean(dim=(2,)).reshape(x.shape[0], -1)[:, :8]

    raw = extract_ijb_features(Probe(), meta, device="cpu")
    assert raw.shape == (2, 16)
    batch = torch.cat(seen)
    assert torch.equal(batch[1], torch.flip(batch[0], dims=[2]))  # row 2i+1 mirrors row 2i
    assert not np.array_equal(raw[0, :8], raw[0, 8:])


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # legacy ONNX exporter
def test_launch_eval_ijb_under_torchrun_equals_one_process(tmp_path):
    """Two processes embed their shards of the crops; the scores equal one process's, and a
    second torchrun run rescoring from the cache agrees on every rank to skip extraction."""
    import subprocess
    import sys

    import torch

    from dist_train.distributed import free_port
    from eval.cli import main as eval_main
    from tests.eval_helpers import TinyNet

    meta, _ = synthetic_layout(tmp_path / "IJBC")
    _images_for(meta, tmp_path / "IJBC")
    model = str(tmp_path / "tiny.onnx")
    torch.onnx.export(TinyNet(16), (torch.randn(2, 3, 32, 32),), model, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, dynamo=False)  # fmt: skip
    args = ["--weights", model, "--ijb", str(tmp_path / "IJBC"), "--image-size", "32",
            "--no-plots", "--batch-size", "8"]  # fmt: skip
    one = eval_main([*args, "--out", str(tmp_path / "one")])["IJBC"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
           str(free_port()), str(ROOT / "launch" / "eval.py"), *args, "--out",
           str(tmp_path / "two")]  # fmt: skip
    for source in ("extracted", "cache"):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "on 2 process(es)" in proc.stdout
        doc = json.loads((tmp_path / "two" / "report.json").read_text())
        assert doc["targets"]["IJBC"]["ijb"]["features"] == source
        np.testing.assert_allclose(
            np.load(tmp_path / "two" / "ijbc_scores.npy"), one.scores, atol=1e-6
        )
    assert doc["targets"]["IJBC"]["metrics"]["rank1"] == pytest.approx(one.metrics["rank1"])


def _images_for(meta: ijb.IJBMeta, root: Path) -> None:
    """Noise images under loose_crop/ and landmarks inside them (extraction needs pixels)."""
    import cv2

    rng = np.random.default_rng(0)
    for name in sorted(set(meta.names)):
        cv2.imwrite(str(root / "loose_crop" / name), rng.integers(0, 255, (60, 50, 3), np.uint8))
    lmk = root / "meta" / "ijbc_name_5pts_score.txt"
    rows = [line.split() for line in lmk.read_text().splitlines()]
    pts = "12 20 36 20 24 30 15 42 33 42"
    lmk.write_text("".join(f"{r[0]} {pts} {r[-1]}\n" for r in rows))


@pytest.mark.usefixtures("tiny_backbone")
def test_cache_is_reused_for_other_switches_and_refused_for_other_weights(tmp_path):
    import torch

    from eval.cli import main as eval_main
    from eval.runner import extract_ijb_features
    from tests.eval_helpers import TINY, TinyNet

    meta, _ = synthetic_layout(tmp_path / "IJBC")
    _images_for(meta, tmp_path / "IJBC")
    weights = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        path = tmp_path / f"w{seed}.pt"
        config = {"backbone": {"name": TINY, "embedding_size": 16}}
        torch.save({"backbone": TinyNet(16).state_dict(), "config": config}, path)
        weights.append(str(path))
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return extract_ijb_features(*args, **kwargs)

    out = tmp_path / "out"
    base = ["--ijb", str(tmp_path / "IJBC"), "--image-size", "32", "--out", str(out), "--no-plots"]
    first = eval_main(["--weights", weights[0], *base], extract_ijb=counting)["IJBC"]
    again = eval_main(
        ["--weights", weights[0], *base, "--ijb-no-detector-score"], extract_ijb=counting
    )
    assert len(calls) == 1
    doc = json.loads((out / "report.json").read_text())["targets"]["IJBC"]
    assert doc["ijb"]["features"] == "cache" and doc["ijb"]["detector_score"] is False
    assert not np.allclose(again["IJBC"].scores, first.scores)
    raw = np.load(out / "ijbc_features.npy")
    assert raw.shape == (meta.num_images, 32)
    want = ijb.evaluate(meta, raw, ijb.IJBSwitches(detector_score=False))
    np.testing.assert_array_equal(again["IJBC"].scores, want.scores)
    np.testing.assert_array_equal(np.load(out / "ijbc_scores.npy"), want.scores)
    # other weights: a stale cache is not reused
    eval_main(["--weights", weights[1], *base], extract_ijb=counting)
    assert len(calls) == 2
    assert (
        json.loads((out / "report.json").read_text())["targets"]["IJBC"]["ijb"]["features"]
        == "extracted"
    )


@pytest.mark.usefixtures("tiny_backbone")
def test_evaluate_targets_full_takes_an_ijb_folder_next_to_a_bin(tmp_path):
    from eval.options import EvalOptions
    from eval.runner import evaluate_targets_full, extract_ijb_features, score_ijb
    from tests.eval_helpers import TinyNet, write_targets

    meta, _ = synthetic_layout(tmp_path / "data" / "IJBC")
    _images_for(meta, tmp_path / "data" / "IJBC")
    bin_path = write_targets(str(tmp_path / "data"), num_ids=3)[0]
    net = TinyNet(16).eval()
    full = evaluate_targets_full(
        net, [bin_path, str(tmp_path / "data" / "IJBC")], image_size=32, batch_size=8
    )
    assert list(full) == ["val", "IJBC"]
    options = EvalOptions(image_size=32, batch_size=8)
    meta = ijb.read_meta(str(tmp_path / "data" / "IJBC"), "IJBC")  # with the new landmarks
    raw = extract_ijb_features(net, meta, options)
    want = score_ijb(meta, raw)
    np.testing.assert_array_equal(full["IJBC"].scores, want.scores)
    assert full["IJBC"].metrics == want.metrics
    with pytest.raises(ijb.IJBError, match=r"name the target as IJBB:"):
        ijb.read_meta_spec(str(tmp_path / "data"))
    assert ijb.read_meta_spec(f"ijbc:{tmp_path / 'data' / 'IJBC'}").num_images == meta.num_images


@pytest.mark.slow
def test_training_scores_an_ijb_folder_among_its_test_targets(tiny_data, tmp_path):
    from dist_train.config import load_config
    from dist_train.distributed import DistInfo
    from dist_train.trainer import Trainer
    from tests.conftest import tiny_overrides

    meta, _ = synthetic_layout(tmp_path / "IJBC")
    _images_for(meta, tmp_path / "IJBC")
    run = tmp_path / "run"
    overrides = {"max_steps": 2, "eval.test_targets": f"[IJBC:{tmp_path / 'IJBC'}]"}
    cfg = load_config(None, tiny_overrides(tiny_data, run, **overrides))
    Trainer(cfg, DistInfo()).fit()
    doc = json.loads((run / "metrics_test.json").read_text())
    m = doc["metrics"]["IJBC"]
    assert {"tar@far=1e-4", "auc", "rank1", "tpir@fpir=1e-2", "num_templates"} <= set(m)
    assert m["num_images"] == meta.num_images


@pytest.mark.slow
def test_training_scores_ijb_targets_at_the_end_and_every_n_epochs_only(tiny_data, tmp_path):
    from dist_train.config import load_config
    from dist_train.distributed import DistInfo
    from dist_train.trainer import Trainer
    from tests.conftest import tiny_overrides
    from tests.eval_helpers import write_targets

    meta, _ = synthetic_layout(tmp_path / "IJBC")
    _images_for(meta, tmp_path / "IJBC")
    bin_path = write_targets(str(tmp_path / "bins"), num_ids=3)[0]
    overrides = {
        "num_epochs": 3,
        "eval.targets": f"[{bin_path}, IJBC:{tmp_path / 'IJBC'}]",
        "eval.at_start": True,
        "eval.every_epoch": True,
        "eval.ijb_every_epochs": 2,
    }
    cfg = load_config(None, tiny_overrides(tiny_data, tmp_path / "run", **overrides))
    seen: list[tuple[str, list[str]]] = []
    Trainer(cfg, DistInfo()).fit(on_evaluate=lambda tag, res: seen.append((tag, sorted(res))))
    # at start, epoch 1: the .bin only; epoch 2 (every 2nd): both; the end of the run: both
    assert seen == [
        ("initial", ["val"]),
        ("", ["val"]),
        ("", ["IJBC", "val"]),
        ("", ["IJBC", "val"]),
    ]
