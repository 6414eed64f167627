"""``launch/rec.py make-bin``: LFW pairs.txt and labelled pair lists -> InsightFace ``.bin``.

Checks pair order and labels, that size x size JPEGs are stored byte for byte, how other
images are stored, clear errors, that the evaluator's pair-list path and the ``.bin`` path give
identical metrics, and the real pairs file of ``../shared/realfaces``.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

import backbones
from dist_train.data.datasets import decode_image
from dist_train.data.transforms import resize
from eval.make_bin import make_bin, read_pairs
from eval.runner import evaluate_targets
from eval.targets import TargetError, load_bin, pair_list_target
from launch.rec import main as rec_main
from tests.eval_helpers import identity_images, tiny_backbone  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "realfaces"
NUM_IDS, PER_ID, SIZE = 10, 4, 32


def _lfw_tree(tmp_path: Path, odd_sizes: bool = False) -> tuple[Path, Path, list, Path]:
    """An LFW-style tree ``images/name/name_%04d.jpg`` (32x32 JPEGs; with ``odd_sizes`` every
    third image is 48x40 instead), its ``pairs.txt`` (2 folds of 10 + 10) and the same pairs
    as a ``label,path1,path2`` list. Returns ``(images, pairs_txt, pairs, pairs_csv)`` where
    ``pairs`` is ``[(file1, file2, same)]`` relative to ``images``."""
    images = tmp_path / "images"
    faces = identity_images(NUM_IDS, PER_ID, seed=3)
    for i, group in enumerate(faces):
        name = f"Person_{i:02d}"
        (images / name).mkdir(parents=True)
        for k, img in enumerate(group, start=1):
            if odd_sizes and (i * PER_ID + k) % 3 == 0:
                img = cv2.resize(img, (40, 48), interpolation=cv2.INTER_LINEAR)
            bgr = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
            data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
            (images / name / f"{name}_{k:04d}.jpg").write_bytes(data)
    rng = np.random.default_rng(5)
    lines, pairs = ["2\t10"], []
    for fold in range(2):
        for n in range(10):
            i = (fold * 10 + n) % NUM_IDS
            a, b = sorted(rng.choice(PER_ID, 2, replace=False) + 1)
            name = f"Person_{i:02d}"
            lines.append(f"{name}\t{a}\t{b}")
            pairs.append((f"{name}/{name}_{a:04d}.jpg", f"{name}/{name}_{b:04d}.jpg", True))
        for n in range(10):
            i = (fold * 10 + n) % NUM_IDS
            j = (i + 1 + int(rng.integers(0, NUM_IDS - 1))) % NUM_IDS
            a, b = (int(v) + 1 for v in rng.integers(0, PER_ID, 2))
            n1, n2 = f"Person_{i:02d}", f"Person_{j:02d}"
            lines.append(f"{n1}\t{a}\t{n2}\t{b}")
            pairs.append((f"{n1}/{n1}_{a:04d}.jpg", f"{n2}/{n2}_{b:04d}.jpg", False))
    pairs_txt = tmp_path / "pairs.txt"
    pairs_txt.write_text("\n".join(lines) + "\n")
    pairs_csv = tmp_path / "pairs.csv"
    pairs_csv.write_text(
        "label,path1,path2\n" + "".join(f"{int(s)},{a},{b}\n" for a, b, s in pairs)
    )
    return images, pairs_txt, pairs, pairs_csv


@pytest.mark.parametrize("fmt", ["pairs.txt", "csv"])
def test_make_bin_keeps_order_labels_and_jpeg_bytes(tmp_path, fmt, capsys):
    images, pairs_txt, pairs, pairs_csv = _lfw_tree(tmp_path)
    src = pairs_txt if fmt == "pairs.txt" else pairs_csv
    out = tmp_path / "lfw.bin"
    argv = ["make-bin", "--pairs", str(src), "--images", str(images), "--out", str(out)]
    assert rec_main([*argv, "--size", str(SIZE), "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pairs"] == 40 and summary["same"] == 20
    assert summary["reencoded"] == 0 and summary["kept"] == summary["images"]
    bins, issame = load_bin(str(out))
    assert issame.tolist() == [s for _, _, s in pairs]  # pair order preserved
    for p, (a, b, _) in enumerate(pairs):  # the original JPEG bytes, no re-encode
        assert bins[2 * p] == (images / a).read_bytes()
        assert bins[2 * p + 1] == (images / b).read_bytes()


@pytest.mark.parametrize("encode", ["png", "jpeg"])
def test_other_sizes_are_resized_with_the_eval_resize(tmp_path, encode):
    images, pairs_txt, pairs, _ = _lfw_tree(tmp_path, odd_sizes=True)
    out = tmp_path / "lfw.bin"
    summary = make_bin(pairs_txt, out, images, size=SIZE, encode=encode)
    assert summary["reencoded"] > 0 and summary["kept"] > 0
    bins, _ = load_bin(str(out))
    for p, (a, b, _) in enumerate(pairs):
        for data, rel in ((bins[2 * p], a), (bins[2 * p + 1], b)):
            orig = (images / rel).read_bytes()
            src = decode_image(orig)
            if src.shape[:2] == (SIZE, SIZE):
                assert data == orig
                continue
            assert data[:4] == (b"\x89PNG" if encode == "png" else b"\xff\xd8\xff\xe0")
            got = decode_image(data)
            want = resize(src, SIZE)
            if encode == "png":  # lossless: exactly the evaluator's pixels
                np.testing.assert_array_equal(got, want)
            else:
                bgr = cv2.cvtColor(want, cv2.COLOR_RGB2BGR)
                assert (
                    data == cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
                )
    again = tmp_path / "again.bin"
    make_bin(pairs_txt, again, images, size=SIZE, encode=encode)
    assert again.read_bytes() == out.read_bytes()  # deterministic


@pytest.mark.parametrize("odd_sizes", [False, True])
def test_bin_and_pair_list_give_identical_metrics(tmp_path, tiny_backbone, odd_sizes):  # noqa: F811
    images, pairs_txt, _, pairs_csv = _lfw_tree(tmp_path, odd_sizes=odd_sizes)
    out = tmp_path / "lfw.bin"
    make_bin(pairs_txt, out, images, size=SIZE)
    net = backbones.get_backbone(tiny_backbone, embedding_size=16)
    # separate calls: nothing is shared between the two targets' embeddings
    via_bin = evaluate_targets(net, [str(out)], batch_size=16, image_size=SIZE)["lfw"]
    (tmp_path / "list").mkdir()
    lst = tmp_path / "list" / "lfw.csv"
    lst.write_text(pairs_csv.read_text())
    target = pair_list_target(str(lst), images_root=str(images))
    via_list = evaluate_targets(net, [target], batch_size=16, image_size=SIZE)["lfw"]
    assert via_bin["num_pairs"] == 40
    assert 0.5 < via_bin["accuracy"]  # the metrics are meaningful
    assert json.dumps(via_bin, sort_keys=True) == json.dumps(via_list, sort_keys=True)


def test_errors_name_the_file_and_line(tmp_path):
    images, pairs_txt, _, pairs_csv = _lfw_tree(tmp_path)
    lines = pairs_txt.read_text().splitlines()
    out = tmp_path / "x.bin"

    bad = tmp_path / "bad.txt"
    bad.write_text("\n".join(lines[:3] + ["Person_01\t1"] + lines[4:]) + "\n")
    with pytest.raises(TargetError, match=rf"{bad}:4: expected 'name i j'"):
        make_bin(bad, out, images)
    bad.write_text("\n".join(lines[:5] + ["Person_01\tx\t2"] + lines[6:]) + "\n")
    with pytest.raises(TargetError, match=rf"{bad}:6: image number 'x'"):
        make_bin(bad, out, images)
    bad.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(TargetError, match=r"2 fold\(s\) of 10 .* there are 39 pair lines"):
        make_bin(bad, out, images)
    bad.write_text("\n".join(lines[:2] + ["Person_03\t1\t9"] + lines[3:]) + "\n")
    with pytest.raises(TargetError, match=rf"{bad}:3: cannot read image .*Person_03_0009.jpg"):
        make_bin(bad, out, images)
    csv_lines = pairs_csv.read_text().splitlines()
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("\n".join(csv_lines[:7] + ["2,a.jpg,b.jpg"]) + "\n")
    with pytest.raises(TargetError, match=rf"{bad_csv}:8: label must be 0 or 1"):
        make_bin(bad_csv, out, images)
    bad_csv.write_text("a.jpg,b.jpg\n")
    with pytest.raises(TargetError, match=rf"{bad_csv}:1: a .bin needs labels"):
        make_bin(bad_csv, out, images)
    (images / "broken.jpg").write_bytes(b"not an image")
    bad_csv.write_text("1,broken.jpg,Person_00/Person_00_0001.jpg\n")
    with pytest.raises(TargetError, match=rf"{bad_csv}:1: image .*broken.jpg"):
        make_bin(bad_csv, out, images)
    assert not out.exists()
    # the command line prints the same message and exits 2
    argv = ["make-bin", "--pairs", str(bad_csv), "--images", str(images), "--out", str(out)]
    assert rec_main([*argv, "--quiet"]) == 2


@pytest.mark.skipif(not (REAL / "photos" / "pairs.csv").is_file(), reason=f"no {REAL}")
def test_real_pairs_file(tmp_path):
    out = tmp_path / "photos.bin"
    pairs = read_pairs(REAL / "photos" / "pairs.csv", REAL / "photos")
    summary = make_bin(REAL / "photos" / "pairs.csv", out, REAL / "photos")
    assert (summary["pairs"], summary["same"], summary["images"]) == (520, 140, 61)
    bins, issame = load_bin(str(out))
    assert len(bins) == 1040 and int(issame.sum()) == 140
    assert issame.tolist() == [p.issame for p in pairs]
    assert {decode_image(b).shape for b in bins[:20]} == {(112, 112, 3)}
