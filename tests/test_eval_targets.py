"""Tests of eval.targets: safe .bin loading (hostile pickles), pair lists, scores files."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from dist_train.data.transforms import EvalTransform
from eval.options import EvalOptions
from eval.targets import (
    TargetError,
    load_bin,
    load_target,
    pair_list_target,
    prepare_image,
    write_scores,
)
from tests.eval_helpers import IMAGE_SIZE, encode, identity_images, write_targets


class _Hostile:
    """Unpickling this would run a shell command creating a marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _hostile_bin(tmp_path, payload_first: bool):
    marker = tmp_path / "pwned"
    imgs = [encode(identity_images(1, 1)[0][0])] * 2
    obj = (_Hostile(str(marker)), [True]) if payload_first else (imgs, [_Hostile(str(marker))])
    path = tmp_path / "hostile.bin"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    return str(path), marker


@pytest.mark.parametrize("payload_first", [True, False])
def test_hostile_bin_raises_and_executes_nothing(tmp_path, payload_first):
    path, marker = _hostile_bin(tmp_path, payload_first)
    with pytest.raises(TargetError, match="hostile.bin.*posix.system|hostile.bin.*system"):
        load_bin(path)
    assert not marker.exists()
    with pytest.raises(TargetError, match="hostile.bin"):
        load_target(path)
    assert not marker.exists()


def test_hostile_payload_is_live_under_plain_pickle(tmp_path):
    # Proves the test above can fail: a plain pickle.load of the same file runs the command.
    path, marker = _hostile_bin(tmp_path, payload_first=True)
    code = f"import pickle; pickle.load(open({path!r}, 'rb'))"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_bin_round_trip_python3_variants(tmp_path, protocol, as_numpy):
    imgs = identity_images(2, 2)
    raw = [encode(imgs[0][0]), encode(imgs[0][1], ".jpg"), encode(imgs[1][0]), encode(imgs[1][1])]
    bins = [np.frombuffer(b, np.uint8) for b in raw] if as_numpy else raw
    issame = np.array([True, False]) if as_numpy else [True, False]
    path = tmp_path / "set.bin"
    path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
    got_bins, got_issame = load_bin(str(path))
    assert got_bins == raw
    np.testing.assert_array_equal(got_issame, [True, False])
    assert got_issame.dtype == bool


@pytest.mark.parametrize("protocol", [2, 4])
def test_bin_with_numpy_bool_scalars(tmp_path, protocol):
    img = encode(identity_images(1, 1)[0][0])
    path = tmp_path / "scalars.bin"
    path.write_bytes(pickle.dumps(([img] * 4, [np.bool_(True), np.bool_(False)]), protocol))
    assert load_bin(str(path))[1].tolist() == [True, False]
    # A float64 scalar is refused.
    path.write_bytes(pickle.dumps(([img] * 2, [np.float64(1.0)]), protocol))
    with pytest.raises(TargetError, match="scalars.bin"):
        load_bin(str(path))


def test_bin_python2_pickle(tmp_path):
    # What InsightFace's Python 2 files hold: SHORT_BINSTRING images and NEWTRUE/NEWFALSE.
    imgs = identity_images(1, 2)
    a, b = encode(imgs[0][0]), encode(imgs[0][1])

    def binstring(data: bytes) -> bytes:
        return b"T" + len(data).to_bytes(4, "little") + data  # BINSTRING opcode

    blob = (
        b"\x80\x02"  # PROTO 2
        + b"]("
        + binstring(a)
        + binstring(b)
        + b"e"  # list of two py2 str
        + b"](\x88e"  # [True]
        + b"\x86."  # TUPLE2, STOP
    )
    path = tmp_path / "py2.bin"
    path.write_bytes(blob)
    bins, issame = load_bin(str(path))
    assert bins == [a, b] and issame.tolist() == [True]


def test_bin_shape_and_type_errors(tmp_path):
    img = encode(identity_images(1, 1)[0][0])
    cases = {
        "odd.bin": ([img] * 3, [True]),
        "float.bin": ([img, img], [0.5]),
        "notuple.bin": {"bins": [img]},
        "strs.bin": (["a", "b"], [True]),
    }
    for name, obj in cases.items():
        path = tmp_path / name
        path.write_bytes(pickle.dumps(obj))
        with pytest.raises(TargetError, match=name):
            load_bin(str(path))
    # A numpy array of a dtype other than bool/uint8 is refused by the unpickler.
    path = tmp_path / "f64.bin"
    path.write_bytes(pickle.dumps(([img, img], np.array([1.0]))))
    with pytest.raises(TargetError, match="f64.bin.*dtype"):
        load_bin(str(path))
    with pytest.raises(TargetError, match="missing.bin"):
        load_bin(str(tmp_path / "missing.bin"))
    (tmp_path / "garbage.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(TargetError, match="garbage.bin"):
        load_bin(str(tmp_path / "garbage.bin"))


def test_bin_and_pair_list_targets_agree(tmp_path):
    bin_path, csv_path, test_path, issame = write_targets(str(tmp_path), num_ids=5, per_id=4)
    t_bin = load_target(bin_path)
    t_csv = load_target(csv_path)
    assert t_bin.name == "val" and t_csv.name == "val_pairs"
    np.testing.assert_array_equal(t_bin.issame, issame)
    np.testing.assert_array_equal(t_csv.issame, issame)
    # Images used by several pairs are embedded once, in both formats.
    assert t_bin.num_images == t_csv.num_images < 2 * len(issame)
    # Image of each pair side is identical in both (PNG is lossless).
    a = t_bin.load_images(0, t_bin.num_images)
    b = t_csv.load_images(0, t_csv.num_images)
    for p in range(len(issame)):
        for side in (0, 1):
            np.testing.assert_array_equal(a[t_bin.pairs[p, side]], b[t_csv.pairs[p, side]])
    assert a.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE) and a.dtype == np.uint8
    t_test = load_target(test_path)
    assert not t_test.labelled and t_test.num_pairs == len(issame)


def test_bin_target_deduplicates_identical_images(tmp_path):
    imgs = identity_images(2, 2)
    a, b, c = encode(imgs[0][0]), encode(imgs[0][1]), encode(imgs[1][0])
    path = tmp_path / "dup.bin"
    path.write_bytes(pickle.dumps(([a, b, a, c, c, b], [True, False, False])))
    t = load_target(str(path))
    assert t.sources == [a, b, c]
    assert t.pairs.tolist() == [[0, 1], [0, 2], [2, 1]]


def test_pair_list_formats_and_errors(tmp_path):
    write_targets(str(tmp_path), num_ids=3, per_id=4)
    lst = tmp_path / "l.txt"
    lst.write_text(
        "label,path1,path2\n# comment\n\n1 images/id0/0.png images/id0/1.png\n"
        "0,images/id0/0.png,images/id1/0.png\n"
    )
    t = pair_list_target(str(lst))
    assert t.issame.tolist() == [True, False] and t.num_images == 3
    assert t.pair_names[1] == ("images/id0/0.png", "images/id1/0.png")
    # An images root other than the list's directory.
    sub = tmp_path / "lists"
    sub.mkdir()
    (sub / "x.csv").write_text("1,id0/0.png,id0/1.png\n0,id0/0.png,id2/0.png\n")
    assert pair_list_target(str(sub / "x.csv"), images_root=str(tmp_path / "images")).num_pairs == 2
    bad = {
        "label.csv": ("2,images/id0/0.png,images/id0/1.png\n", "label.csv:1: label"),
        "missing.csv": ("1,images/id0/0.png,images/nope.png\n", "missing.csv:1: image"),
        "mixed.csv": (
            "1,images/id0/0.png,images/id0/1.png\nimages/id0/0.png,images/id0/1.png\n",
            "mixed.csv:2",
        ),
        "wide.csv": ("1,a,b,c\n", "wide.csv:1"),
        "empty.csv": ("# nothing\n", "empty.csv: no pairs"),
    }
    for name, (text, msg) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(TargetError, match=msg):
            pair_list_target(str(tmp_path / name))


def test_write_scores(tmp_path):
    _, _, test_path, _ = write_targets(str(tmp_path), num_ids=3, per_id=4)
    t = load_target(test_path)
    out = tmp_path / "scores.csv"
    write_scores(str(out), t, np.linspace(-1, 1, t.num_pairs))
    lines = out.read_text().splitlines()
    assert lines[0] == "score,path1,path2" and len(lines) == t.num_pairs + 1
    score, p1, p2 = lines[1].split(",")
    assert float(score) == -1.0 and (p1, p2) == t.pair_names[0]


def test_decode_image_resizes_and_names_bad_data():
    img = identity_images(1, 1)[0][0]
    out = prepare_image(encode(img), "x", EvalTransform(16))
    assert out.shape == (3, 16, 16)
    np.testing.assert_array_equal(prepare_image(encode(img), "x"), img.transpose(2, 0, 1))
    with pytest.raises(TargetError, match="lfw.bin: image 7"):
        prepare_image(b"garbage", "lfw.bin: image 7")


def test_pair_list_over_a_recordio_pack(tmp_path):
    from dist_train.data import recordio

    imgs = identity_images(3, 2)
    flat = [img for group in imgs for img in group]  # key k = image k, identity k // 2
    rec, idx = tmp_path / "val.rec", tmp_path / "val.idx"
    with recordio.RecordIOWriter(str(rec), str(idx)) as writer:
        for k, img in enumerate(flat):
            header = recordio.IRHeader(0, float(k // 2), k, 0)
            writer.write(recordio.pack(header, encode(img)), key=k)
    lst = tmp_path / "pairs.csv"
    lst.write_text("1,0,1\n0,1,2\n1,4,5\n0,3,5\n")
    t = load_target(str(lst), images_root=str(rec))
    assert t.issame.tolist() == [True, False, True, False] and t.num_images == 6
    got = t.load_images(0, t.num_images)
    for i, src in enumerate(t.sources):
        np.testing.assert_array_equal(got[i], flat[src.key].transpose(2, 0, 1))
    (tmp_path / "bad.csv").write_text("1,0,x\n")
    with pytest.raises(TargetError, match="bad.csv:1: 'x' is not a record key"):
        load_target(str(tmp_path / "bad.csv"), images_root=str(rec))
    (tmp_path / "missing.csv").write_text("1,0,99\n")
    with pytest.raises(TargetError, match="missing.csv:1: key 99 is not in"):
        load_target(str(tmp_path / "missing.csv"), images_root=str(rec))


def test_decode_image_center_crops_like_the_training_transform():
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
    data = encode(img)
    for size, crop in [(24, 32), (16, 0), (40, 0), (48, 36)]:
        want = EvalTransform(size, center_crop=crop)(prepare_image(data, "x").transpose(1, 2, 0))
        got = prepare_image(data, "x", EvalOptions(image_size=size, center_crop=crop).transform())
        np.testing.assert_array_equal(got, want.transpose(2, 0, 1))
