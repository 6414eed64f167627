"""MXNet RecordIO, read and written in pure Python (no mxnet import).

Owns: the on-disk segment format of dmlc-core's ``RecordIOWriter``/``RecordIOReader`` as used by
MXNet 1.9.1 (and so by every InsightFace ``train.rec``), the text ``.idx`` index, the 24-byte
image-record header ``IRHeader`` with multi-label support, and a ``verify`` pass that reports
every problem of a file in one run. Does not own: what the records mean (the InsightFace layout
lives in :mod:`dist_train.data.datasets`) or image decoding.

Why one module of this size: the reader, the writer, the index and ``verify`` share the segment
layout and its continuation rules below; split apart, each half would have to restate them.

Format facts (all integers little-endian, as MXNet writes them on x86/ARM):

* A record is one or more *segments*: ``magic:u32 = 0xced7230a``, ``lrec:u32``, data, then zero
  padding up to a multiple of 4 bytes. ``lrec = (cflag << 29) | length`` with a 29-bit length.
* The writer looks for the magic at every 4-byte-aligned offset of the payload. At each hit the
  payload is cut there and the 4 magic bytes are dropped: the first piece gets ``cflag=1``,
  middle pieces ``cflag=2`` and the last piece ``cflag=3`` (``cflag=0``: a record in one piece).
  The reader puts the magic back between pieces. Unaligned occurrences are left alone.
* The index is text, one ``key<TAB>offset`` line per record, offset of the first segment.
* ``IRHeader`` is ``struct 'IfQQ'`` (flag u32, label f32, id u64, id2 u64) = 24 bytes. With an
  array label, ``flag`` is the number of labels, the header's label field is 0 and the labels
  follow the header as float32 before the payload.
"""

from __future__ import annotations

import numbers
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
MAX_RECORD_BYTES = (1 << _LENGTH_BITS) - 1
"""dmlc-core refuses records of 2**29 bytes or more (the length field has 29 bits)."""

_SEG_HEAD = struct.Struct("<II")
_IR_STRUCT = struct.Struct("<IfQQ")
IR_SIZE = _IR_STRUCT.size  # 24


class RecordIOError(ValueError):
    """A RecordIO file, index or record that cannot be used.

    The message names the file, the key (when known) and the byte offset.
    """

    def __init__(self, path: str | os.PathLike, message: str, *, key: Any = None, offset=None):
        where = str(path)
        if key is not None:
            where += f" key {key}"
        if offset is not None:
            where += f" at byte offset {offset}"
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.key = key
        self.offset = offset


# ---------------------------------------------------------------------------------------------
# Record header (mxnet.recordio.pack / unpack)


class IRHeader(NamedTuple):
    """Header of an image record.

    Attributes:
        flag: number of float32 labels stored after the header (0: ``label`` is the label).
        label: a float, or a float32 array ``[flag]`` when ``flag > 0``.
        id: record id (u64).
        id2: high bits of the id (u64), usually 0.
    """

    flag: int
    label: float | np.ndarray
    id: int
    id2: int


def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """Record bytes = 24-byte header (+ float32 labels) + ``payload``, exactly as mxnet packs.

    A number as label forces ``flag=0``; anything else is taken as an array of labels: ``flag``
    becomes its size (an empty list gives flag 0 and no labels), the header's label field 0.
    """
    flag, label, rid, rid2 = header
    if isinstance(label, numbers.Number):
        return _IR_STRUCT.pack(0, label, rid, rid2) + bytes(payload)
    labels = np.asarray(label, dtype=np.float32).ravel()
    return _IR_STRUCT.pack(labels.size, 0.0, rid, rid2) + labels.tobytes() + bytes(payload)


def unpack(record: bytes, *, path: str = "<record>", key: Any = None) -> tuple[IRHeader, bytes]:
    """Inverse of :func:`pack`: ``(IRHeader, payload)``.

    With ``flag > 0`` the label is a float32 array of ``flag`` values read after the header.

    Raises:
        RecordIOError: the record is shorter than its header says.
    """
    if len(record) < IR_SIZE:
        raise RecordIOError(
            path,
            f"record of {len(record)} bytes is shorter than the {IR_SIZE}-byte header",
            key=key,
        )
    flag, label, rid, rid2 = _IR_STRUCT.unpack_from(record)
    if flag > 0:
        end = IR_SIZE + 4 * flag
        if len(record) < end:
            raise RecordIOError(
                path,
                f"header says {flag} labels but the record has only {len(record) - IR_SIZE} "
                "bytes after the header",
                key=key,
            )
        labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
        return IRHeader(flag, labels, rid, rid2), bytes(record[end:])
    return IRHeader(flag, label, rid, rid2), bytes(record[IR_SIZE:])


# ---------------------------------------------------------------------------------------------
# Segment encoding


def _aligned_magic_positions(payload: bytes) -> list[int]:
    """Offsets of the magic in ``payload`` that are multiples of 4 (where dmlc splits)."""
    hits = []
    start = payload.find(MAGIC_BYTES)
    while start != -1:
        if start % 4 == 0:
            hits.append(start)
            start = payload.find(MAGIC_BYTES, start + 4)
        else:
            start = payload.find(MAGIC_BYTES, start + 1)
    return hits


def _segment(cflag: int, data: bytes | memoryview) -> bytes:
    pad = (-len(data)) % 4
    return _SEG_HEAD.pack(MAGIC, (cflag << _LENGTH_BITS) | len(data)) + bytes(data) + b"\0" * pad


def encode_record(payload: bytes) -> bytes:
    """On-disk bytes of one record: its segments, split at aligned magics, with padding."""
    if len(payload) > MAX_RECORD_BYTES:
        raise ValueError(f"record of {len(payload)} bytes exceeds RecordIO's 2**29 - 1 limit")
    hits = _aligned_magic_positions(payload)
    if not hits:
        return _segment(0, payload)
    view = memoryview(payload)
    parts, start = [], 0
    for i, hit in enumerate(hits):
        parts.append(_segment(1 if i == 0 else 2, view[start:hit]))
        start = hit + 4
    parts.append(_segment(3, view[start:]))
    return b"".join(parts)


# ---------------------------------------------------------------------------------------------
# Writer


class RecordIOWriter:
    """Writes records (and optionally the ``.idx``) byte-identical to mxnet's writer.

    Args:
        rec_path: ``.rec`` file, created or truncated.
        idx_path: ``.idx`` file to write alongside (``None``: no index).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w") if self.idx_path is not None else None
        self._pos = 0
        self._count = 0

    def write(self, record: bytes, key: int | None = None) -> int:
        """Appends one record; returns its byte offset.

        Args:
            record: the record bytes (e.g. from :func:`pack`).
            key: index key; ``None`` uses the number of records written before this one.
        """
        if self._rec.closed:
            raise ValueError(f"{self.rec_path}: write to a closed RecordIOWriter")
        data = encode_record(record)
        offset = self._pos
        self._rec.write(data)
        self._pos += len(data)
        if self._idx is not None:
            k = self._count if key is None else key
            if not isinstance(k, numbers.Integral):
                raise TypeError(f"{self.rec_path}: index keys are integers, got {k!r}")
            self._idx.write(f"{int(k)}\t{offset}\n")
        self._count += 1
        return offset

    def close(self) -> None:
        """Flushes and closes the files."""
        if not self._rec.closed:
            self._rec.close()
        if self._idx is not None and not self._idx.closed:
            self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Reader


def read_index(idx_path: str | os.PathLike) -> tuple[list[int], dict[int, int]]:
    """Parses a ``.idx`` file into (keys in file order, key -> offset).

    Raises:
        RecordIOError: a malformed line or a duplicate key (naming the line).
    """
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(idx_path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            try:
                if len(fields) != 2:
                    raise ValueError
                key, offset = int(fields[0]), int(fields[1])
                if offset < 0:
                    raise ValueError
            except ValueError:
                raise RecordIOError(
                    idx_path, f"line {lineno} is not 'key<TAB>offset': {line[:80]!r}"
                ) from None
            if key in offsets:
                raise RecordIOError(idx_path, f"line {lineno}: duplicate key", key=key)
            offsets[key] = offset
            keys.append(key)
    return keys, offsets


class RecordIOReader:
    """Reads records by key (with an index) or in file order (with or without one).

    Safe across ``fork``/``spawn`` and pickling: the file is opened lazily in each process, so
    each DataLoader worker gets its own handle.

    Args:
        rec_path: the ``.rec`` file.
        idx_path: its ``.idx`` (``None``: keys are record ordinals 0..N-1, found by a scan of
            the segment headers on first use).

    Raises:
        RecordIOError: a missing or empty file, a bad index, or a corrupt record (on access).
    """

    def __init__(self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path is not None else None
        if not self.rec_path.is_file():
            raise RecordIOError(self.rec_path, "file does not exist")
        self.size = self.rec_path.stat().st_size
        if self.size == 0:
            raise RecordIOError(self.rec_path, "file is empty (0 bytes)", offset=0)
        self._keys: list[int] | None = None
        self._offsets: dict[int, int] | None = None
        if self.idx_path is not None:
            if not self.idx_path.is_file():
                raise RecordIOError(self.idx_path, "index file does not exist")
            self._keys, self._offsets = read_index(self.idx_path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._next: dict[int, int] | None = None

    # Lazy, per-process file handle ------------------------------------------------------
    def _handle(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            # A handle inherited through fork shares its position with the parent; pread does
            # not use the position, but a fresh descriptor per process keeps workers independent.
            self._fd = os.open(self.rec_path, os.O_RDONLY)
            self._pid = os.getpid()
        return self._fd

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_fd"] = None
        state["_pid"] = None
        return state

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> RecordIOReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Keys ---------------------------------------------------------------------------------
    def _ensure_keys(self) -> None:
        if self._keys is None:
            starts = scan_offsets(self.rec_path)
            self._keys = list(range(len(starts)))
            self._offsets = dict(enumerate(starts))

    @property
    def keys(self) -> list[int]:
        """Keys in index order (ordinals 0..N-1 without an index)."""
        self._ensure_keys()
        return self._keys

    def offset(self, key: int) -> int:
        """Byte offset of the record with ``key``."""
        self._ensure_keys()
        try:
            return self._offsets[key]
        except KeyError:
            raise RecordIOError(
                self.idx_path or self.rec_path, "key is not in the index", key=key
            ) from None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key: object) -> bool:
        self._ensure_keys()
        return key in self._offsets

    # Reading ------------------------------------------------------------------------------
    def _span(self, offset: int) -> int:
        """Bytes from ``offset`` to the next indexed offset (0 when unknown).

        Reading that many bytes in one ``pread`` usually fetches the whole record at once
        (one system call instead of two per segment).
        """
        if self._next is None:
            self._ensure_keys()
            starts = sorted(set(self._offsets.values()))
            ends = starts[1:] + [self.size]
            self._next = dict(zip(starts, ends))
        end = self._next.get(offset, 0)
        return end - offset if 0 < end - offset <= 64 << 20 else 0

    def read(self, key: int) -> bytes:
        """The record stored under ``key`` (segments joined, magic restored)."""
        offset = self.offset(key)
        return _read_record(
            self._handle(), self.rec_path, self.size, offset, key, self._span(offset)
        )[0]

    def read_at(self, offset: int, *, key: Any = None) -> tuple[bytes, int]:
        """``(record, end_offset)`` for the record whose first segment starts at ``offset``."""
        return _read_record(self._handle(), self.rec_path, self.size, offset, key)

    def __iter__(self) -> Iterator[tuple[int, bytes]]:
        """Yields ``(key, record)`` in index order, or in file order without an index."""
        if self.idx_path is not None:
            for key in self.keys:
                yield key, self.read(key)
            return
        offset, ordinal = 0, 0
        while offset < self.size:
            record, offset = self.read_at(offset, key=ordinal)
            yield ordinal, record
            ordinal += 1


def _pread(fd: int, n: int, offset: int) -> bytes:
    return os.pread(fd, n, offset)


def _read_record(
    fd: int, path: Path, size: int, offset: int, key: Any, hint: int = 0
) -> tuple[bytes, int]:
    """Parses the record at ``offset``; ``hint`` bytes are read up front in one call."""
    if offset % 4:
        raise RecordIOError(
            path,
            "offset is not a multiple of 4 (records are 4-byte aligned)",
            key=key,
            offset=offset,
        )
    if offset >= size:
        raise RecordIOError(
            path, f"offset is past the end of the {size}-byte file", key=key, offset=offset
        )
    buf = _pread(fd, hint, offset) if hint else b""
    buf_end = offset + len(buf)

    def get(at: int, n: int) -> bytes:
        if at + n <= buf_end:
            return buf[at - offset : at - offset + n]
        return _pread(fd, n, at)

    parts: list[bytes] = []
    pos, first = offset, True
    while True:
        head = get(pos, 8)
        if len(head) < 8:
            raise RecordIOError(
                path, f"truncated segment header ({len(head)} of 8 bytes)", key=key, offset=pos
            )
        magic, lrec = _SEG_HEAD.unpack(head)
        if magic != MAGIC:
            what = "record start" if first else "continuation segment"
            raise RecordIOError(
                path,
                f"bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}) at {what}"
                + ("; does the index entry point into the middle of a record?" if first else ""),
                key=key,
                offset=pos,
            )
        cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
        if first and cflag not in (0, 1):
            raise RecordIOError(
                path,
                f"segment flag {cflag} where a record starts (expected 0 or 1); the offset "
                "points into the middle of a split record or the file is corrupt",
                key=key,
                offset=pos,
            )
        if not first and cflag not in (2, 3):
            raise RecordIOError(
                path,
                f"continuation segment has flag {cflag} (expected 2 or 3)",
                key=key,
                offset=pos,
            )
        padded = (length + 3) & ~3
        if pos + 8 + padded > size:
            raise RecordIOError(
                path,
                f"segment length {length} runs past the end of the {size}-byte file "
                "(truncated file?)",
                key=key,
                offset=pos,
            )
        if length:
            parts.append(get(pos + 8, length))
        pos += 8 + padded
        if cflag in (0, 3):
            return (parts[0] if len(parts) == 1 else b"".join(parts)), pos
        parts.append(MAGIC_BYTES)
        first = False


def scan_offsets(rec_path: str | os.PathLike) -> list[int]:
    """Start offsets of every record in file order, reading only segment headers.

    Raises:
        RecordIOError: at the first corrupt segment (use :func:`verify` to list them all).
    """
    path = Path(rec_path)
    size = path.stat().st_size
    starts: list[int] = []
    with open(path, "rb") as f:
        fd = f.fileno()
        pos, in_record = 0, False
        while pos < size:
            head = _pread(fd, 8, pos)
            if len(head) < 8:
                raise RecordIOError(path, "truncated segment header", offset=pos)
            magic, lrec = _SEG_HEAD.unpack(head)
            if magic != MAGIC:
                raise RecordIOError(path, f"bad magic 0x{magic:08x}", offset=pos)
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            expected = (2, 3) if in_record else (0, 1)
            if cflag not in expected:
                raise RecordIOError(
                    path, f"segment flag {cflag}, expected one of {expected}", offset=pos
                )
            if not in_record:
                starts.append(pos)
            padded = (length + 3) & ~3
            if pos + 8 + padded > size:
                raise RecordIOError(
                    path, f"segment length {length} runs past the end of the file", offset=pos
                )
            in_record = cflag in (1, 2)
            pos += 8 + padded
        if in_record:
            raise RecordIOError(path, "file ends inside a split record", offset=pos)
    return starts


# ---------------------------------------------------------------------------------------------
# Verification


@dataclass(frozen=True)
class Problem:
    """One problem found by :func:`verify`."""

    path: str
    offset: int | None
    key: int | None
    message: str

    def __str__(self) -> str:
        where = self.path
        if self.key is not None:
            where += f" key {self.key}"
        if self.offset is not None:
            where += f" at byte offset {self.offset}"
        return f"{where}: {self.message}"


def _resync(raw: bytes, start: int, size: int) -> int:
    """Next aligned offset >= start holding a plausible segment header, or ``size``."""
    pos = (start + 3) & ~3
    while True:
        pos = raw.find(MAGIC_BYTES, pos)
        if pos == -1:
            return size
        if pos % 4 == 0 and pos + 8 <= size:
            lrec = _SEG_HEAD.unpack_from(raw, pos)[1]
            if lrec >> _LENGTH_BITS in (0, 1) and pos + 8 + (lrec & _LENGTH_MASK) <= size:
                return pos
        pos += 1


def verify(
    rec_path: str | os.PathLike,
    idx_path: str | os.PathLike | None = None,
    *,
    decode_images: bool = False,
    max_problems: int = 1000,
) -> tuple[int, list[Problem]]:
    """Checks a whole ``.rec`` (and its ``.idx``) and reports every problem in one pass.

    Checks: segment magics, flags and lengths (resynchronising after damage), truncation,
    index lines, index keys pointing past the end or not at a record start, and with
    ``decode_images`` that every record unpacks and its payload decodes as an image (records
    with an empty payload, such as InsightFace's header and identity records, are skipped).

    Returns:
        ``(number of readable records, problems)``.
    """
    path = Path(rec_path)
    problems: list[Problem] = []

    def report(message: str, offset: int | None = None, key: int | None = None, p=path) -> None:
        if len(problems) < max_problems:
            problems.append(Problem(str(p), offset, key, message))

    if not path.is_file():
        report("file does not exist")
        return 0, problems
    raw = path.read_bytes()
    size = len(raw)
    if size == 0:
        report("file is empty (0 bytes)", 0)
    records: dict[int, bytes] = {}  # start offset -> record bytes
    inside: set[int] = set()  # offsets of continuation segments (not record starts)
    pos = 0
    while pos < size:
        start, parts, first, ok = pos, [], True, True
        while True:
            if pos + 8 > size:
                report(f"truncated segment header ({size - pos} of 8 bytes)", pos)
                ok, pos = False, size
                break
            magic, lrec = _SEG_HEAD.unpack_from(raw, pos)
            cflag, length = lrec >> _LENGTH_BITS, lrec & _LENGTH_MASK
            padded = (length + 3) & ~3
            bad = None
            if magic != MAGIC:
                bad = f"bad magic 0x{magic:08x}"
            elif first and cflag not in (0, 1):
                bad = f"segment flag {cflag} where a record starts (expected 0 or 1)"
            elif not first and cflag not in (2, 3):
                bad = f"continuation segment has flag {cflag} (expected 2 or 3)"
            elif pos + 8 + padded > size:
                bad = f"segment length {length} runs past the end of the {size}-byte file"
            elif any(raw[pos + 8 + length : pos + 8 + padded]):
                bad = "non-zero padding bytes"
            if bad is not None:
                report(bad, pos)
                ok = False
                pos = _resync(raw, pos + 4, size)
                break
            if not first:
                inside.add(pos)
            parts.append(raw[pos + 8 : pos + 8 + length])
            pos += 8 + padded
            if cflag in (0, 3):
                break
            parts.append(MAGIC_BYTES)
            first = False
        if ok:
            records[start] = b"".join(parts)

    keyed: dict[int, int | None] = dict.fromkeys(records)
    if idx_path is not None:
        idx = Path(idx_path)
        try:
            keys, offsets = read_index(idx)
        except (RecordIOError, OSError) as exc:
            report(f"cannot read the index: {exc}", p=idx)
            keys, offsets = [], {}
        for key in keys:
            off = offsets[key]
            if off >= size:
                report(f"index entry points past the end of the {size}-byte file", off, key)
            elif off in records:
                keyed[off] = key
            elif off in inside:
                report("index entry points at a continuation segment inside a record", off, key)
            else:
                report("index entry does not point at the start of a readable record", off, key)
    else:
        for ordinal, off in enumerate(records):
            keyed[off] = ordinal

    if decode_images:
        import cv2  # local: verify without images needs no OpenCV

        for off, record in records.items():
            key = keyed[off]
            try:
                _, payload = unpack(record, path=str(path), key=key)
            except RecordIOError as exc:
                report(str(exc).split(": ", 1)[-1], off, key)
                continue
            if not payload:
                continue
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                report(f"payload of {len(payload)} bytes is not a decodable image", off, key)
    return len(records), problems
