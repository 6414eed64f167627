"""launch/rec.py: pack (folder and list) -> stats/inspect/verify/unpack round trip, errors."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from dist_train.data import RecordDataset
from dist_train.data.packing import dataset_stats, inspect_records, pack_images, verify_pack
from dist_train.data.recordio import read_index
from launch.rec import main as rec_main

ROOT = Path(__file__).resolve().parents[1]


def _folder(tmp_path, counts=(("ann", 3), ("bob", 1), ("cid", 2)), size=20):
    root = tmp_path / "faces"
    for c, (name, n) in enumerate(counts):
        (root / name).mkdir(parents=True)
        for j in range(n):
            img = np.full((size, size + 4, 3), 40 * c + 10 * j, np.uint8)
            (root / name / f"{j}.jpg").write_bytes(cv2.imencode(".jpg", img)[1].tobytes())
    return root


@pytest.mark.parametrize("workers", [1, 2])
def test_pack_folder_keeps_bytes_and_layout(tmp_path, workers):
    src = _folder(tmp_path)
    summary = pack_images(src, tmp_path / "out", workers=workers)
    assert summary["num_classes"] == 3 and summary["num_images"] == 6
    assert (tmp_path / "out" / "property").read_text().strip() == "3,20,24"
    rows = list(inspect_records(tmp_path / "out"))
    keys = [r["key"] for r in rows]
    assert keys == list(range(10))  # header, 6 images, 3 identity records
    assert rows[0]["flag"] == 2 and rows[0]["label"] == [7.0, 10.0]
    assert [r["label"] for r in rows[7:]] == [[1.0, 4.0], [4.0, 5.0], [5.0, 7.0]]
    files = sorted(src.rglob("*.jpg"))
    for row, f in zip(rows[1:7], files):
        assert row["payload_sha256"] == hashlib.sha256(f.read_bytes()).hexdigest()
    assert [r["label"] for r in rows[1:7]] == [0.0, 0.0, 0.0, 1.0, 2.0, 2.0]
    assert verify_pack(tmp_path / "out") == (10, [])
    st = dataset_stats(tmp_path / "out")
    assert st["identities"] == 3 and st["images"] == 6
    assert st["histogram"]["1-1"] == 1 and st["histogram"]["2-5"] == 2


def test_pack_list_with_resize(tmp_path):
    src = _folder(tmp_path)
    lst = tmp_path / "list.csv"
    lst.write_text("faces/bob/0.jpg,7\nfaces/ann/1.jpg,3\nfaces/ann/0.jpg,3\n")
    pack_images(lst, tmp_path / "out", resize=16, quality=80)
    ds = RecordDataset(tmp_path / "out" / "train.rec")
    assert ds.labels.tolist() == [0, 0, 1] and ds[0][0].shape == (16, 16, 3)
    assert (tmp_path / "out" / "property").read_text().strip() == "2,16,16"
    (src / "bob" / "0.jpg").write_bytes(b"garbage")
    with pytest.raises(Exception, match="bob/0.jpg: not a decodable image"):
        pack_images(lst, tmp_path / "out2")


class _Result:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _cli(*args, cwd, subprocess_run=False):
    """Runs launch/rec.py in-process (fast), or as a real script from ``cwd``."""
    if subprocess_run:
        return subprocess.run(
            [sys.executable, str(ROOT / "launch" / "rec.py"), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=cwd,
        )
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = rec_main([str(a) for a in args])
    finally:
        os.chdir(old)
    return _Result(code, out.getvalue(), err.getvalue())


def test_cli_round_trip_and_verify_errors(tmp_path):
    src = _folder(tmp_path)
    r = _cli(
        "pack", src, "--out", "pk", "--workers", "2", "--quiet", cwd=tmp_path, subprocess_run=True
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["num_images"] == 6
    r = _cli("inspect", "pk/train.rec", "--json", "--limit", "2", cwd=tmp_path)
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    assert len(lines) == 2 and set(lines[1]) == {
        "key",
        "flag",
        "label",
        "id",
        "id2",
        "payload_len",
        "payload_sha256",
    }
    r = _cli("stats", "pk", cwd=tmp_path)
    assert "3 identities, 6 images" in r.stdout
    r = _cli("unpack", "pk", "--out", "back", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = sorted((tmp_path / "back").rglob("*.jpg"))
    assert [p.read_bytes() for p in back] == [p.read_bytes() for p in sorted(src.rglob("*.jpg"))]
    assert _cli("verify", "pk", cwd=tmp_path).returncode == 0
    # damage two records: verify lists both and fails
    rec = tmp_path / "pk" / "train.rec"
    offs = read_index(tmp_path / "pk" / "train.idx")[1]
    data = bytearray(rec.read_bytes())
    data[offs[2]] ^= 1
    data[offs[5] + 8 + 24 : offs[5] + 8 + 40] = b"x" * 16
    rec.write_bytes(bytes(data))
    r = _cli("verify", "pk", cwd=tmp_path)
    assert r.returncode == 1
    assert f"at byte offset {offs[2]}: bad magic" in r.stdout
    assert f"key 5 at byte offset {offs[5]}: payload" in r.stdout
    r = _cli("stats", "missing", cwd=tmp_path)
    assert r.returncode == 2 and "does not exist" in r.stderr
