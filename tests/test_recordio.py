"""RecordIO: byte layout, header packing, reader/writer round trips, corrupt and hostile input."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import struct

import cv2
import numpy as np
import pytest

from dist_train.data.recordio import (
    IR_SIZE,
    MAGIC,
    MAGIC_BYTES,
    IRHeader,
    RecordIOError,
    RecordIOReader,
    RecordIOWriter,
    encode_record,
    pack,
    read_index,
    scan_offsets,
    unpack,
    verify,
)

M = struct.pack("<I", 0xCED7230A)


def seg(cflag: int, data: bytes) -> bytes:
    """A segment written out by hand from the format description."""
    return M + struct.pack("<I", (cflag << 29) | len(data)) + data + b"\0" * ((-len(data)) % 4)


def test_magic_constant_is_little_endian_on_disk():
    assert MAGIC_BYTES == bytes([0x0A, 0x23, 0xD7, 0xCE])
    assert MAGIC == 0xCED7230A


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 6, 7, 8])
def test_every_padding_length(n):
    payload = bytes(range(1, n + 1))
    assert encode_record(payload) == seg(0, payload)
    assert len(encode_record(payload)) % 4 == 0


@pytest.mark.parametrize(
    "payload, expected",
    [
        # aligned magic in the middle: split, magic dropped, flags 1 then 3
        (b"ABCD" + M + b"EF", seg(1, b"ABCD") + seg(3, b"EF")),
        # magic at offset 0: an empty first piece
        (M + b"xyz", seg(1, b"") + seg(3, b"xyz")),
        # a payload that is exactly the magic
        (M, seg(1, b"") + seg(3, b"")),
        # magic at the end
        (b"ABCD" + M, seg(1, b"ABCD") + seg(3, b"")),
        # two magics: first, middle, last pieces
        (b"ABCD" + M + b"EFGH" + M + b"I", seg(1, b"ABCD") + seg(2, b"EFGH") + seg(3, b"I")),
        # back-to-back magics give an empty middle piece
        (M + M, seg(1, b"") + seg(2, b"") + seg(3, b"")),
        # unaligned magic: not split
        (b"A" + M + b"BCD", seg(0, b"A" + M + b"BCD")),
        (b"AB" + M, seg(0, b"AB" + M)),
    ],
)
def test_split_at_aligned_magic(payload, expected, tmp_path):
    assert encode_record(payload) == expected
    rec = tmp_path / "a.rec"
    with RecordIOWriter(rec, tmp_path / "a.idx") as w:
        w.write(payload, key=5)
        w.write(b"tail", key=6)
    reader = RecordIOReader(rec, tmp_path / "a.idx")
    assert reader.read(5) == payload
    assert reader.read(6) == b"tail"
    assert [r for _, r in RecordIOReader(rec)] == [payload, b"tail"]


def test_pack_scalar_label_forces_flag_zero():
    rec = pack(IRHeader(7, 3.0, 11, 2), b"img")
    assert rec == struct.pack("<IfQQ", 0, 3.0, 11, 2) + b"img"
    header, payload = unpack(rec)
    assert header == IRHeader(0, 3.0, 11, 2) and payload == b"img"


def test_pack_array_labels():
    rec = pack(IRHeader(0, [1.5, -2.0, 1e-3], 4, 0), b"zz")
    expected = struct.pack("<IfQQ", 3, 0.0, 4, 0) + np.array([1.5, -2, 1e-3], "<f4").tobytes()
    assert rec == expected + b"zz"
    header, payload = unpack(rec)
    assert header.flag == 3 and payload == b"zz"
    assert header.label.dtype == np.float32
    np.testing.assert_array_equal(header.label, np.float32([1.5, -2.0, 1e-3]))


def test_pack_empty_and_single_label_lists():
    empty = pack(IRHeader(9, [], 1, 0), b"p")
    assert empty == struct.pack("<IfQQ", 0, 0.0, 1, 0) + b"p"
    assert unpack(empty)[0].flag == 0
    one = pack(IRHeader(0, [5.0], 1, 0), b"p")
    assert one[:4] == struct.pack("<I", 1) and len(one) == IR_SIZE + 4 + 1
    h, _ = unpack(one)
    assert h.flag == 1 and h.label.tolist() == [5.0]


def test_float32_label_rounding_matches_numpy():
    x = 0.1  # not representable: both paths must round to the same float32
    scalar = pack(IRHeader(0, x, 0, 0), b"")
    array = pack(IRHeader(0, [x], 0, 0), b"")
    assert scalar[4:8] == np.float32(x).tobytes()
    assert array[IR_SIZE:] == np.float32(x).tobytes()
    # numpy scalars count as numbers (flag 0), 0-d arrays as arrays (flag 1)
    assert pack(IRHeader(0, np.float32(2), 0, 0), b"")[:4] == b"\0\0\0\0"
    assert pack(IRHeader(0, np.array(2.0), 0, 0), b"")[:4] == struct.pack("<I", 1)


def test_unpack_short_record_raises():
    with pytest.raises(RecordIOError, match="shorter than the 24-byte header"):
        unpack(b"\0" * 10, path="x.rec", key=3)
    bad = struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8  # says 4 labels, holds 2
    with pytest.raises(RecordIOError, match="x.rec key 3.*4 labels"):
        unpack(bad, path="x.rec", key=3)


def test_writer_offsets_and_unordered_keys(tmp_path):
    rec, idx = tmp_path / "t.rec", tmp_path / "t.idx"
    payloads = {10: b"a" * 5, 2: b"", 7: b"bcd" + M * 2, 0: b"x" * 4}
    with RecordIOWriter(rec, idx) as w:
        for k, p in payloads.items():
            w.write(p, key=k)
    expected_offsets, pos = [], 0
    for p in payloads.values():
        expected_offsets.append(pos)
        pos += len(encode_record(p))
    assert idx.read_text() == "".join(f"{k}\t{o}\n" for k, o in zip(payloads, expected_offsets))
    assert rec.stat().st_size == pos
    reader = RecordIOReader(rec, idx)
    assert reader.keys == [10, 2, 7, 0] and len(reader) == 4
    for k, p in payloads.items():
        assert reader.read(k) == p
    assert dict(iter(reader)) == payloads
    assert scan_offsets(rec) == expected_offsets
    # without the index: ordinals in file order
    plain = RecordIOReader(rec)
    assert plain.keys == [0, 1, 2, 3]
    assert [r for _, r in plain] == list(payloads.values())
    assert plain.read(2) == payloads[7]


def test_writer_default_keys(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for p in (b"1", b"22", b"333"):
            w.write(p)
    assert read_index(tmp_path / "a.idx")[0] == [0, 1, 2]


def _read_in_child(reader, key, queue):
    queue.put(reader.read(key))


def test_reader_is_picklable_and_fork_safe(tmp_path):
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as w:
        for i in range(20):
            w.write(bytes([i]) * (i + 1), key=i)
    reader = RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert reader.read(3) == b"\3" * 4  # opens a handle in this process
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None and clone.read(5) == b"\5" * 6
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_read_in_child, args=(reader, 7, q))
    p.start()
    assert q.get(timeout=20) == b"\7" * 8
    p.join(20)
    assert reader.read(9) == b"\x09" * 10


def test_oversized_record_rejected():
    class Huge(bytes):
        def __len__(self):
            return 1 << 29

    with pytest.raises(ValueError, match="2\\*\\*29"):
        encode_record(Huge(b""))


# ---------------------------------------------------------------------------------------------
# Corrupt and hostile input


def _jpeg(seed: int = 0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


@pytest.fixture
def good(tmp_path):
    rec, idx = tmp_path / "g.rec", tmp_path / "g.idx"
    with RecordIOWriter(rec, idx) as w:
        for i in range(4):
            w.write(pack(IRHeader(0, float(i), i, 0), _jpeg(i)), key=i)
    return rec, idx


def test_empty_file(tmp_path):
    (tmp_path / "e.rec").write_bytes(b"")
    with pytest.raises(RecordIOError, match=r"e\.rec at byte offset 0: file is empty"):
        RecordIOReader(tmp_path / "e.rec")
    n, problems = verify(tmp_path / "e.rec")
    assert n == 0 and "empty" in str(problems[0])


def test_missing_files(tmp_path):
    with pytest.raises(RecordIOError, match="does not exist"):
        RecordIOReader(tmp_path / "nope.rec")
    (tmp_path / "a.rec").write_bytes(seg(0, b"x"))
    with pytest.raises(RecordIOError, match="index file does not exist"):
        RecordIOReader(tmp_path / "a.rec", tmp_path / "nope.idx")


def test_truncated_file(good, tmp_path):
    rec, idx = good
    data = rec.read_bytes()
    cut = tmp_path / "g.rec"
    cut.write_bytes(data[:-7])
    last = read_index(idx)[1][3]
    reader = RecordIOReader(cut, idx)
    assert reader.read(0)  # earlier records still fine
    with pytest.raises(RecordIOError, match=rf"key 3 at byte offset {last}: .*runs past the end"):
        reader.read(3)
    with pytest.raises(RecordIOError, match="runs past the end"):
        list(RecordIOReader(cut))
    cut.write_bytes(data[: last + 5])  # cut inside the segment header
    with pytest.raises(RecordIOError, match=rf"key 3 at byte offset {last}: truncated segment"):
        RecordIOReader(cut, idx).read(3)


def test_wrong_magic(good):
    rec, idx = good
    off = read_index(idx)[1][2]
    data = bytearray(rec.read_bytes())
    data[off] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"g\.rec key 2 at byte offset {off}: bad magic"):
        RecordIOReader(rec, idx).read(2)


def test_index_past_end_and_into_middle(good):
    rec, idx = good
    size = rec.stat().st_size
    off1 = read_index(idx)[1][1]
    idx.write_text(f"0\t0\n1\t{off1 + 8}\n2\t{size + 100}\n3\t{off1 + 2}\n")
    reader = RecordIOReader(rec, idx)
    with pytest.raises(RecordIOError, match=rf"key 1 at byte offset {off1 + 8}: bad magic"):
        reader.read(1)
    with pytest.raises(RecordIOError, match=rf"key 2 at byte offset {size + 100}: .*past the end"):
        reader.read(2)
    with pytest.raises(RecordIOError, match="key 3 .*multiple of 4"):
        reader.read(3)
    with pytest.raises(RecordIOError, match="key 99"):
        reader.read(99)


def test_index_into_split_record(tmp_path):
    rec, idx = tmp_path / "s.rec", tmp_path / "s.idx"
    with RecordIOWriter(rec, idx) as w:
        w.write(b"ABCD" + M + b"EFGH", key=0)
    second = len(seg(1, b"ABCD"))
    idx.write_text(f"0\t{second}\n")
    with pytest.raises(RecordIOError, match=f"key 0 at byte offset {second}: segment flag 3"):
        RecordIOReader(rec, idx).read(0)
    _, problems = verify(rec, idx)
    assert any("continuation segment" in p.message and p.key == 0 for p in problems)


def test_hostile_length_does_not_allocate(tmp_path):
    rec = tmp_path / "h.rec"
    rec.write_bytes(M + struct.pack("<I", (1 << 29) - 1) + b"abcd")
    with pytest.raises(RecordIOError, match="runs past the end"):
        RecordIOReader(rec).read(0)


def test_bad_index_lines(tmp_path):
    (tmp_path / "a.rec").write_bytes(seg(0, b"x"))
    for text, msg in [("0 0\n", "line 1"), ("0\tx\n", "line 1"), ("0\t0\n0\t0\n", "duplicate")]:
        (tmp_path / "a.idx").write_text(text)
        with pytest.raises(RecordIOError, match=msg):
            RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")


def test_verify_clean(good):
    rec, idx = good
    assert verify(rec, idx, decode_images=True) == (4, [])


def test_verify_reports_every_problem_in_one_pass(good):
    rec, idx = good
    offsets = read_index(idx)[1]
    data = bytearray(rec.read_bytes())
    data[offsets[1]] ^= 0xFF  # record 1: bad magic
    # record 2: payload replaced by text of the same length (not an image)
    _, payload = unpack(RecordIOReader(rec, idx).read(2))
    start = offsets[2] + 8 + IR_SIZE
    data[start : start + len(payload)] = b"n" * len(payload)
    size = len(data)
    data = data[:-3]  # record 3: truncated
    rec.write_bytes(bytes(data))
    idx.write_text(idx.read_text() + f"9\t{size * 2}\n")
    n, problems = verify(rec, idx, decode_images=True)
    text = "\n".join(map(str, problems))
    assert n == 2  # records 0 and 2 are readable
    assert f"at byte offset {offsets[1]}: bad magic" in text
    assert f"key 2 at byte offset {offsets[2]}: payload" in text and "not a decodable" in text
    assert f"at byte offset {offsets[3]}: segment length" in text
    assert "key 9" in text and "past the end" in text
    assert f"key 1 at byte offset {offsets[1]}: index entry does not point" in text
