"""Cross-check of our RecordIO against real MXNet 1.9.1, in both directions.

MXNet never enters the project's environment: the test builds an isolated virtual environment
(``mxnet==1.9.1``, ``numpy==1.23.5``, the last numpy mxnet imports with) in a cache directory,
reused on later runs (``$DIST_TRAIN_MXNET_VENV`` or ``~/.cache/dist_train/mxnet-venv``), and
talks to it through a subprocess script and JSON files.

* ours -> mxnet: the same records written by both writers give byte-identical ``.rec`` and
  ``.idx`` files; mxnet reads our files back with identical headers, payloads and (through
  ``mx.image.imdecode``) pixels.
* mxnet -> ours: our reader, with the index and by sequential scan, returns mxnet's headers
  and payloads.

The test skips only when PyPI cannot be reached (or no Python <= 3.11 exists for numpy 1.23.5);
any other failure to build the environment fails it. The first run takes a minute or two.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from dist_train.data.recordio import (
    MAGIC_BYTES,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    pack,
    unpack,
)

pytestmark = [pytest.mark.mxnet, pytest.mark.timeout(900)]

VENV = Path(
    os.environ.get("DIST_TRAIN_MXNET_VENV", Path.home() / ".cache" / "dist_train" / "mxnet-venv")
)
PACKAGES = ["mxnet==1.9.1", "numpy==1.23.5"]

# Runs inside the mxnet environment. argv: spec.json out_dir ours.rec ours.idx
MX_SCRIPT = r"""
import hashlib, json, sys
import numpy as np
import mxnet as mx

spec = json.load(open(sys.argv[1]))
out = sys.argv[2]
ours_rec, ours_idx = sys.argv[3], sys.argv[4]

def header_of(r):
    label = r["label"]
    label = float(label) if r["scalar"] else label
    return mx.recordio.IRHeader(r["flag"], label, r["id"], r["id2"])

# 1. mxnet writes the same records (indexed, then plain)
w = mx.recordio.MXIndexedRecordIO(out + "/mx.idx", out + "/mx.rec", "w")
for r in spec:
    w.write_idx(r["key"], mx.recordio.pack(header_of(r), bytes.fromhex(r["payload"])))
w.close()
w = mx.recordio.MXRecordIO(out + "/mx_plain.rec", "w")
for r in spec:
    w.write(mx.recordio.pack(header_of(r), bytes.fromhex(r["payload"])))
w.close()

# 2. mxnet reads our files
rd = mx.recordio.MXIndexedRecordIO(ours_idx, ours_rec, "r")
result = {"keys": [int(k) for k in rd.keys], "records": {}}
for k in rd.keys:
    h, payload = mx.recordio.unpack(rd.read_idx(k))
    label = [float(x) for x in h.label] if h.flag > 0 else float(h.label)
    entry = {"flag": int(h.flag), "label": label, "id": int(h.id), "id2": int(h.id2),
             "payload": payload.hex()}
    if payload[:3] == b"\xff\xd8\xff" or payload[:4] == b"\x89PNG":
        img = mx.image.imdecode(payload).asnumpy()  # RGB, HWC uint8
        np.save(out + "/pix_%d.npy" % k, img)
        entry["pixels"] = True
    result["records"][str(k)] = entry
rd.close()
# sequential read of our file without index
seq = mx.recordio.MXRecordIO(ours_rec, "r")
n = 0
while seq.read() is not None:
    n += 1
result["sequential_count"] = n
json.dump(result, open(out + "/mx_read.json", "w"))
print("ok", mx.__version__, np.__version__)
"""


def _pypi_reachable() -> bool:
    try:
        urllib.request.urlopen("https://pypi.org/simple/mxnet/", timeout=15).close()
        return True
    except (urllib.error.URLError, OSError):
        return False


def _base_python() -> str | None:
    """A Python <= 3.11 (numpy 1.23.5 has no wheels for newer versions)."""
    if sys.version_info[:2] <= (3, 11):
        return sys.executable
    for name in ("python3.11", "python3.10", "python3.9", "python3.8"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _venv_python() -> str:
    py = VENV / "bin" / "python"
    check = [str(py), "-c", "import mxnet, numpy; assert mxnet.__version__ == '1.9.1'"]
    if py.exists() and subprocess.run(check, capture_output=True, timeout=300).returncode == 0:
        return str(py)
    base = _base_python()
    if base is None:
        pytest.skip("no Python <= 3.11 available for numpy 1.23.5 (needed by mxnet 1.9.1)")
    shutil.rmtree(VENV, ignore_errors=True)
    VENV.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([base, "-m", "venv", str(VENV)], check=True, timeout=300)
    res = subprocess.run(
        [str(py), "-m", "pip", "install", "--disable-pip-version-check", "-q", *PACKAGES],
        capture_output=True,
        text=True,
        timeout=800,
    )
    if res.returncode != 0:
        shutil.rmtree(VENV, ignore_errors=True)
        if not _pypi_reachable():
            pytest.skip("PyPI is unreachable: cannot install mxnet==1.9.1 for the cross-check")
        pytest.fail(f"installing {PACKAGES} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    res = subprocess.run(check, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"mxnet does not import in {VENV}:\n{res.stderr[-3000:]}"
    return str(py)


def _image(seed: int, ext: str) -> bytes:
    rng = np.random.default_rng(seed)
    img = cv2.GaussianBlur(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8), (5, 5), 2)
    return cv2.imencode(ext, img)[1].tobytes()


def _spec() -> list[dict]:
    m = MAGIC_BYTES
    payloads = [
        b"",
        b"a",
        b"ab",
        b"abc",
        b"abcd",
        b"abcde",
        b"ABCD" + m + b"EF",  # aligned magic: split into 2 segments
        m,  # exactly the magic
        m + m + b"x" + m,  # back-to-back and unaligned-after-split
        b"A" + m + b"BCD",  # unaligned: not split
        b"xy" + m + b"zw" + m,  # unaligned occurrences only
        bytes(range(256)) * 3,
        _image(1, ".jpg"),
        _image(2, ".png"),
        _image(3, ".jpg"),
    ]
    labels = [
        (3.0, True),
        (0.1, True),
        ([], False),
        ([5.0], False),
        ([1.5, -2.25, 1e-3], False),
        (1e10, True),
        ([0.1, 0.2, 0.3, 0.4], False),
        (7.0, True),
        ([2.0, 3.0], False),
        (-1.0, True),
        ([1e-8], False),
        (123456789.0, True),
        (4.0, True),
        ([9.0, 1.0], False),
        (0.0, True),
    ]
    keys = [5, 0, 14, 2, 9, 1, 3, 13, 7, 4, 6, 12, 10, 8, 11]  # not in order
    spec = []
    for i, (payload, (label, scalar)) in enumerate(zip(payloads, labels)):
        # the flag we pass is ignored by pack (label type decides), as in mxnet
        spec.append(
            {
                "key": keys[i],
                "flag": 9,
                "label": label,
                "scalar": scalar,
                "id": 1000 + i,
                "id2": i % 3,
                "payload": payload.hex(),
            }
        )
    return spec


def _our_header(r: dict) -> IRHeader:
    label = float(r["label"]) if r["scalar"] else r["label"]
    return IRHeader(r["flag"], label, r["id"], r["id2"])


def test_crosscheck_with_mxnet(tmp_path):
    py = _venv_python()
    spec = _spec()
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    ours_rec, ours_idx = tmp_path / "ours.rec", tmp_path / "ours.idx"
    with RecordIOWriter(ours_rec, ours_idx) as w:
        for r in spec:
            w.write(pack(_our_header(r), bytes.fromhex(r["payload"])), key=r["key"])
    with RecordIOWriter(tmp_path / "ours_plain.rec") as w:
        for r in spec:
            w.write(pack(_our_header(r), bytes.fromhex(r["payload"])))
    script = tmp_path / "mx_side.py"
    script.write_text(MX_SCRIPT)
    res = subprocess.run(
        [py, str(script), str(tmp_path / "spec.json"), str(tmp_path), str(ours_rec), str(ours_idx)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-4000:]
    assert res.stdout.startswith("ok 1.9.1 1.23.5")

    # Writers: byte-identical files.
    assert ours_rec.read_bytes() == (tmp_path / "mx.rec").read_bytes()
    assert ours_idx.read_text() == (tmp_path / "mx.idx").read_text()
    assert (tmp_path / "ours_plain.rec").read_bytes() == (tmp_path / "mx_plain.rec").read_bytes()
    # the split cases really produced continuation segments (flags 1..3 in the file)
    raw = ours_rec.read_bytes()
    flags = {
        struct.unpack_from("<I", raw, p + 4)[0] >> 29
        for p in range(0, len(raw) - 8, 4)
        if raw[p : p + 4] == MAGIC_BYTES
    }
    assert {0, 1, 2, 3} <= flags

    # mxnet reading our files: same keys (in index order), headers, payloads, pixels.
    got = json.loads((tmp_path / "mx_read.json").read_text())
    assert got["keys"] == [r["key"] for r in spec]
    assert got["sequential_count"] == len(spec)
    ours = RecordIOReader(ours_rec, ours_idx)
    for r in spec:
        mx_entry = got["records"][str(r["key"])]
        header, payload = unpack(ours.read(r["key"]))
        assert mx_entry["payload"] == payload.hex() == r["payload"]
        assert (mx_entry["flag"], mx_entry["id"], mx_entry["id2"]) == (
            header.flag,
            header.id,
            header.id2,
        )
        if header.flag > 0:
            assert mx_entry["label"] == [float(x) for x in header.label]
        else:
            assert mx_entry["label"] == float(header.label)
        if mx_entry.get("pixels"):
            mx_pix = np.load(tmp_path / f"pix_{r['key']}.npy")
            our_pix = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR),
                cv2.COLOR_BGR2RGB,
            )
            assert mx_pix.shape == our_pix.shape
            diff = np.abs(mx_pix.astype(int) - our_pix.astype(int))
            if payload[:4] == b"\x89PNG":
                assert diff.max() == 0
            else:  # JPEG decoders (libjpeg builds) may differ by rounding only
                assert diff.max() <= 2 and diff.mean() < 0.1, (diff.max(), diff.mean())

    # Our reader on mxnet's files: with the index and by sequential scan.
    mx_reader = RecordIOReader(tmp_path / "mx.rec", tmp_path / "mx.idx")
    assert mx_reader.keys == [r["key"] for r in spec]
    plain = list(RecordIOReader(tmp_path / "mx_plain.rec"))
    assert len(plain) == len(spec)
    for (ordinal, record), r in zip(plain, spec):
        assert ordinal == spec.index(r)
        h, payload = unpack(record)
        h2, payload2 = unpack(mx_reader.read(r["key"]))
        assert payload == payload2 == bytes.fromhex(r["payload"])
        expected_flag = 0 if r["scalar"] else len(r["label"])
        assert h.flag == h2.flag == expected_flag
        assert (h.id, h.id2) == (r["id"], r["id2"])
        want = np.float32(r["label"]) if r["scalar"] else np.asarray(r["label"], np.float32)
        np.testing.assert_array_equal(np.float32(h.label) if r["scalar"] else h.label, want)
