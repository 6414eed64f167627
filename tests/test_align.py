"""Face alignment: the similarity transform, YuNet on the shared real photos, the face-choice rule,
the report, ``launch/align.py`` and ``launch/rec.py pack --align``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from dist_train.data import align, packing
from dist_train.data.recordio import RecordIOReader, unpack

ROOT = Path(__file__).resolve().parents[1]
# ../shared/realfaces beside the repository; REALFACES overrides it (e.g. from a git worktree)
REAL = Path(os.environ.get("REALFACES", Path(__file__).resolve().parents[2] / "shared/realfaces"))
YUNET = REAL / "models" / "face_detection_yunet.onnx"
needs_real = pytest.mark.skipif(
    not YUNET.is_file(), reason=f"shared real-face data not found at {REAL} (see issue 13)"
)


def _rotation(deg: float) -> np.ndarray:
    a = np.deg2rad(deg)
    return np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])


# ---------------------------------------------------------------------------------------------
# the transform


def test_template_maps_onto_itself():
    t = align.arcface_template(112)
    m = align.similarity_transform(t, t)
    np.testing.assert_allclose(m, [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_template_scales_with_size():
    np.testing.assert_allclose(align.arcface_template(224), 2 * align.ARCFACE_TEMPLATE_112)
    assert align.ARCFACE_TEMPLATE_112[0].tolist() == [38.2946, 51.6963]


@pytest.mark.parametrize("deg,scale,shift", [(17.0, 2.5, (140.0, -33.0)), (-80.0, 0.4, (3, 9))])
def test_recovers_a_known_similarity_exactly(deg, scale, shift):
    t = align.arcface_template(112)
    true = np.hstack([scale * _rotation(deg), np.array(shift, float)[:, None]])
    src = t @ true[:, :2].T + true[:, 2]
    # src = true(t), so the fit of src onto t is the inverse of true
    m = align.similarity_transform(src, t)
    inv = np.linalg.inv(np.vstack([true, [0, 0, 1]]))[:2]
    np.testing.assert_allclose(m, inv, atol=1e-10)
    np.testing.assert_allclose(src @ m[:, :2].T + m[:, 2], t, atol=1e-9)


def test_least_squares_not_a_reflection():
    t = align.arcface_template(112)
    mirrored = t * [-1, 1]  # a mirror image: the best similarity must still be a rotation
    m = align.similarity_transform(mirrored, t)
    assert np.linalg.det(m[:, :2]) > 0


def test_align_face_puts_landmarks_on_the_template():
    # an image with 5 dots at a rotated, scaled, shifted copy of the template
    t = align.arcface_template(112)
    true = np.hstack([1.7 * _rotation(25.0), np.array([[90.0], [40.0]])])
    pts = t @ true[:, :2].T + true[:, 2]
    img = np.zeros((400, 400, 3), np.uint8)
    for x, y in pts:
        cv2.circle(img, (round(x), round(y)), 4, (255, 255, 255), -1)
    out = align.align_face(img, pts, 112)
    assert out.shape == (112, 112, 3)
    for x, y in t:
        assert out[round(y), round(x)].min() > 200, (x, y)


# ---------------------------------------------------------------------------------------------
# landmarks files


def test_read_landmarks_csv_and_insightface_lst(tmp_path):
    t = align.arcface_template(112)
    csv_file = tmp_path / "m.csv"
    header = "path," + ",".join(f"{a}{i}" for i in range(1, 6) for a in "xy")
    csv_file.write_text(header + "\na/1.jpg," + ",".join(str(v) for v in t.ravel()) + "\n")
    got = align.read_landmarks(csv_file)
    np.testing.assert_allclose(got["a/1.jpg"], t)
    lst = tmp_path / "m.lst"
    vals = "\t".join(str(v) for v in np.concatenate([t[:, 0], t[:, 1]]))  # x1..x5, y1..y5
    lst.write_text(f"0\ta/1.jpg\t0\t1\t2\t100\t110\t{vals}\n1\ta/2.jpg\t0\n")
    got = align.read_landmarks(lst)
    assert list(got) == ["a/1.jpg"]
    np.testing.assert_allclose(got["a/1.jpg"], t)
    bad = tmp_path / "bad.csv"
    bad.write_text("a.jpg,1,2,3\n")
    with pytest.raises(align.AlignError, match=r"bad\.csv:1: expected path \+ 10"):
        align.read_landmarks(bad)


# ---------------------------------------------------------------------------------------------
# the detector on real photos


@needs_real
@pytest.mark.parametrize("folder,rate", [("photos", 0.95), ("crops", 1.0)])
def test_yunet_detection_rate_on_real_faces(folder, rate):
    det = align.YuNetDetector(YUNET)
    files = [p for p in sorted((REAL / folder).rglob("*")) if p.suffix in (".jpg", ".png")]
    start = time.perf_counter()
    found = sum(bool(det.detect(cv2.imread(str(p)))) for p in files)
    ms = 1000 * (time.perf_counter() - start) / len(files)
    print(f"{folder}: a face in {found}/{len(files)} images, {ms:.1f} ms per image")
    assert len(files) >= 40
    assert found / len(files) >= rate


@needs_real
def test_multi_person_photo_yields_the_face_the_rule_names():
    det = align.YuNetDetector(YUNET)
    img = cv2.imread(str(REAL / "photos_multi" / "selfie-many-people.jpg"))
    faces = det.detect(img)
    assert len(faces) >= 4
    h, w = img.shape[:2]

    def centre(f):
        x, y, bw, bh = f.box
        return x + bw / 2, y + bh / 2

    # largest: the selfie-taker's face, cut by the right edge of the photo
    big = faces[align.choose_face(faces, img.shape, "largest")]
    assert big.box[0] + big.box[2] >= w - 1
    # center (the default): the big face nearest the middle, the man in the upper centre-right
    mid = faces[align.choose_face(faces, img.shape, "center")]
    assert mid is not big
    cx, cy = centre(mid)
    assert 0.55 * w < cx < 0.8 * w and cy < 0.45 * h, centre(mid)
    # every face at least as large is farther from the centre
    d = lambda f: np.hypot(centre(f)[0] - w / 2, centre(f)[1] - h / 2)  # noqa: E731
    area = lambda f: f.box[2] * f.box[3]  # noqa: E731
    assert all(d(f) > d(mid) for f in faces if f is not mid and area(f) >= area(mid))
    # score: the detector's most confident face
    top = faces[align.choose_face(faces, img.shape, "score")]
    assert top.score == max(f.score for f in faces)


def test_choose_face_rules_on_made_up_boxes():
    def face(x, y, w, h, s):
        return align.Face((x, y, w, h), np.zeros((5, 2)), s)

    faces = [face(0, 0, 60, 60, 0.99), face(170, 170, 50, 50, 0.7), face(380, 380, 20, 20, 0.8)]
    shape = (400, 400, 3)
    assert align.choose_face(faces, shape, "largest") == 0
    assert align.choose_face(faces, shape, "center") == 1
    assert align.choose_face(faces, shape, "score") == 0
    with pytest.raises(align.AlignError, match="unknown face-choice rule"):
        align.choose_face(faces, shape, "middle")


# ---------------------------------------------------------------------------------------------
# folders, report, CLI


def _small_tree(dst: Path) -> Path:
    """2 identities of real photos (jpg), 1 crop (png), one blank image and one broken file."""
    src = dst / "src"
    for rel in ["photos/p01/img1.jpg", "photos/p01/img2.jpg", "photos/p02/img26.jpg"]:
        (src / Path(rel).parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(REAL / rel, src / Path(rel).parent.name / Path(rel).name)
    (src / "amy").mkdir()
    shutil.copy(REAL / "crops" / "amy" / "amy1.png", src / "amy" / "amy1.png")
    cv2.imwrite(str(src / "p02" / "blank.jpg"), np.full((300, 200, 3), 128, np.uint8))
    (src / "p02" / "broken.jpg").write_bytes(b"not a jpeg")
    return src


@needs_real
@pytest.mark.parametrize("on_miss", ["skip", "center"])
def test_report_counts_and_misses(tmp_path, on_miss):
    src = _small_tree(tmp_path)
    opts = align.AlignOptions(detector=str(YUNET), on_miss=on_miss)
    report = align.align_folder(src, tmp_path / "out", opts)
    assert report == json.loads((tmp_path / "out" / "align_report.json").read_text())
    c = report["counts"]
    assert (c["images"], c["found"], c["missed"], c["unreadable"]) == (6, 4, 1, 1)
    assert c["written"] == (4 if on_miss == "skip" else 5)
    blank = report["files"]["p02/blank.jpg"]
    assert blank["status"] == "missed" and "no face" in blank["reason"]
    assert blank["action"] == ("skipped" if on_miss == "skip" else "center crop")
    assert (tmp_path / "out" / "p02" / "blank.jpg").exists() == (on_miss == "center")
    assert report["files"]["p02/broken.jpg"]["status"] == "unreadable"
    hit = report["files"]["p01/img1.jpg"]
    assert hit["status"] == "found" and hit["score"] >= 0.6 and len(hit["box"]) == 4
    out = cv2.imread(str(tmp_path / "out" / "amy" / "amy1.png"), cv2.IMREAD_UNCHANGED)
    assert out.shape == (112, 112, 3)


@needs_real
def test_landmarks_file_is_used_before_the_detector(tmp_path):
    src = _small_tree(tmp_path)
    t = align.arcface_template(112) * 2 + 10  # a face at twice the size, shifted
    marks = tmp_path / "marks.csv"
    marks.write_text("p02/blank.jpg," + ",".join(f"{v:.4f}" for v in t.ravel()) + "\n")
    opts = align.AlignOptions(detector=None, size=56)
    report = align.align_folder(src, tmp_path / "out", opts, landmarks_file=marks)
    assert report["files"]["p02/blank.jpg"]["source"] == "landmarks file"
    assert report["counts"]["found"] == 1
    assert "no detector" in report["files"]["p01/img1.jpg"]["reason"]
    assert cv2.imread(str(tmp_path / "out" / "p02" / "blank.jpg")).shape == (56, 56, 3)


@needs_real
@pytest.mark.slow
def test_cli_end_to_end_deterministic_across_workers(tmp_path):
    src = _small_tree(tmp_path)
    runs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        cmd = [sys.executable, str(ROOT / "launch" / "align.py"), str(src), "--out", str(out)]
        cmd += ["--detector", str(YUNET), "--workers", str(workers), "--on-miss", "center"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        summary = json.loads(res.stdout.strip().splitlines()[-1])
        assert (summary["found"], summary["missed"], summary["written"]) == (4, 1, 5)
        runs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()})
    assert runs[0] == runs[1]
    assert sorted(map(str, runs[0])) == [
        "align_report.json", "amy/amy1.png", "p01/img1.jpg", "p01/img2.jpg", "p02/blank.jpg",
        "p02/img26.jpg",
    ]  # fmt: skip
    res = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "align.py"), str(src), "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2 and "need a detector model or a landmarks file" in res.stderr


@needs_real
def test_pack_with_align(tmp_path):
    src = _small_tree(tmp_path)
    (src / "p02" / "broken.jpg").unlink()
    opts = align.AlignOptions(detector=str(YUNET), on_miss="skip")
    summary = packing.pack_images(src, tmp_path / "pack", align=opts)
    assert summary["align"]["missed"] == 1
    assert (summary["num_images"], summary["num_classes"]) == (4, 3)
    assert (summary["height"], summary["width"]) == (112, 112)
    assert json.loads((tmp_path / "pack" / "align_report.json").read_text())["counts"]["found"] == 4
    assert sorted(p.name for p in (tmp_path / "pack").iterdir()) == [
        "align_report.json", "classes.txt", "property", "train.idx", "train.rec",
    ]  # fmt: skip
    with RecordIOReader(tmp_path / "pack" / "train.rec", tmp_path / "pack" / "train.idx") as r:
        _, payload = unpack(r.read(1))
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (112, 112, 3)


@needs_real
def test_rec_pack_align_cli(tmp_path):
    src = _small_tree(tmp_path)
    (src / "p02" / "broken.jpg").unlink()
    cmd = [sys.executable, str(ROOT / "launch" / "rec.py"), "pack", str(src)]
    cmd += ["--out", str(tmp_path / "pack"), "--align", "--quiet"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "--align needs --detector" in res.stderr
    cmd += ["--detector", str(YUNET), "--on-miss", "center"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["num_images"] == 5 and summary["align"]["missed"] == 1


@needs_real
def test_couple_photo_default_rule_yields_the_person_of_p01():
    """Two faces of nearly equal size: ``center`` picks the one nearer the middle, which the real
    MobileFaceNet recognises as identity p01 of ``photos/`` (and the other face as nobody there)."""
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime (extra 'export') not installed")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(REAL / "models" / "mobilefacenet_512.onnx"), so)

    def embed(face112: np.ndarray) -> np.ndarray:
        x = (face112[:, :, ::-1].astype(np.float32) / 255 - 0.5) / 0.5
        v = sess.run(None, {"input": x.transpose(2, 0, 1)[None]})[0][0]
        return v / np.linalg.norm(v)

    det = align.YuNetDetector(YUNET)
    img = cv2.imread(str(REAL / "photos_multi" / "couple.jpg"))
    faces = det.detect(img)
    assert len(faces) == 2
    chosen = align.choose_face(faces, img.shape, "center")
    p01 = []
    for p in sorted((REAL / "photos" / "p01").glob("*.jpg"))[:4]:
        im = cv2.imread(str(p))
        fs = det.detect(im)
        p01.append(embed(align.align_face(im, fs[align.choose_face(fs, im.shape)].landmarks)))
    sims = [np.mean([embed(align.align_face(img, f.landmarks)) @ g for g in p01]) for f in faces]
    assert sims[chosen] > 0.5 > sims[1 - chosen], sims


def test_rec_pack_detector_without_align_is_an_error(tmp_path):
    cmd = [sys.executable, str(ROOT / "launch" / "rec.py"), "pack", str(tmp_path)]
    cmd += ["--out", str(tmp_path / "pack"), "--detector", "x.onnx"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "only with --align" in res.stderr
