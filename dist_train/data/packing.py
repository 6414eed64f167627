"""Building, inspecting and unpacking InsightFace-layout RecordIO packs.

Owns: the InsightFace pack layout on the writing side (header record 0 with
``label = [num_images + 1, num_images + 1 + num_classes]``, images at keys ``1..num_images``
grouped by identity with a scalar label, one record per identity with
``label = [first_key, last_key + 1]``, a ``property`` file ``num_classes,H,W``), and the
operations behind ``launch/rec.py``: pack (image folder or ``path,label`` list, several
processes, optionally aligning faces first through :mod:`.align`), inspect, verify, stats, unpack. Does not own: the byte format
(:mod:`.recordio`) or training-time reading (:mod:`.datasets`).
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .align import AlignOptions, align_folder
from .datasets import IMAGE_EXTENSIONS, DataError, RecordDataset, list_dataset
from .recordio import IRHeader, RecordIOReader, RecordIOWriter, pack, unpack, verify


class InsightFacePackWriter:
    """Writes ``train.rec``/``train.idx``/``property`` in the InsightFace layout.

    Images must arrive grouped by identity, identities in increasing order 0..C-1.

    Args:
        out_dir: directory for the three files (created).
        num_images: images that will be added (the header record needs it up front).
        num_classes: identities that will be added.
    """

    def __init__(self, out_dir: str | os.PathLike, num_images: int, num_classes: int):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.num_images, self.num_classes = int(num_images), int(num_classes)
        self._w = RecordIOWriter(self.out / "train.rec", self.out / "train.idx")
        self._id_base = self.num_images + 1
        self._w.write(pack(IRHeader(2, [self._id_base, self._id_base + num_classes], 0, 0), b""), 0)
        self._key = 1
        self._ranges: list[tuple[int, int]] = []

    def add(self, label: int, payload: bytes) -> None:
        """Appends one encoded image of identity ``label``."""
        if label == len(self._ranges):
            self._ranges.append((self._key, self._key))
        elif label != len(self._ranges) - 1:
            raise ValueError(
                f"images must come grouped by identity in order 0..C-1; got identity {label} "
                f"after {len(self._ranges) - 1}"
            )
        if self._key > self.num_images:
            raise ValueError(f"more than the announced {self.num_images} images")
        self._w.write(pack(IRHeader(0, float(label), self._key, 0), payload), key=self._key)
        self._key += 1
        self._ranges[-1] = (self._ranges[-1][0], self._key)

    def close(self, height: int, width: int) -> None:
        """Writes the identity records and ``property``; checks the announced counts."""
        if self._key - 1 != self.num_images or len(self._ranges) != self.num_classes:
            raise ValueError(
                f"announced {self.num_images} images of {self.num_classes} identities, got "
                f"{self._key - 1} of {len(self._ranges)}"
            )
        for ident, (start, stop) in enumerate(self._ranges):
            key = self._id_base + ident
            self._w.write(pack(IRHeader(2, [start, stop], key, 0), b""), key=key)
        self._w.close()
        (self.out / "property").write_text(f"{self.num_classes},{height},{width}\n")


# ---------------------------------------------------------------------------------------------
# pack


def _scan_folder(root: Path) -> tuple[list[str], list[int], list[str]]:
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    paths, labels, kept = [], [], []
    for name in names:
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            continue
        kept.append(name)
        paths += [str(f) for f in files]
        labels += [len(kept) - 1] * len(files)
    return paths, labels, kept


def _load_for_pack(job: tuple[str, int, int]) -> tuple[bytes, int, int]:
    """(payload, height, width) of one file: original bytes, or re-encoded when asked."""
    path, size, quality = job
    try:
        buf = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    img = cv2.imdecode(np.frombuffer(buf, np.uint8), cv2.IMREAD_COLOR) if buf else None
    if img is None:
        raise DataError(f"{path}: not a decodable image")
    if size or quality:
        if size:
            interp = cv2.INTER_AREA if size < min(img.shape[:2]) else cv2.INTER_LINEAR
            img = cv2.resize(img, (size, size), interpolation=interp)
        ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality or 95])
        if not ok:
            raise DataError(f"{path}: JPEG encoding failed")
        buf = enc.tobytes()
    return buf, img.shape[0], img.shape[1]


def _ordered_map(fn: Callable, jobs: list, workers: int) -> Iterator:
    if workers <= 1:
        yield from map(fn, jobs)
        return
    # forkserver: workers start from a clean process. A plain fork copies OpenCV's thread
    # pool in whatever state the parent left it, which deadlocked workers here.
    ctx = mp.get_context("forkserver" if os.name == "posix" else "spawn")
    with ctx.Pool(workers, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        yield from pool.imap(fn, jobs, chunksize=max(1, min(64, len(jobs) // (workers * 8))))


def list_sources(source: str | os.PathLike) -> tuple[list[str], list[int], list[str]]:
    """(image paths, labels 0..C-1, identity names) of a folder or a ``path,label`` list."""
    src = Path(source)
    if src.is_dir():
        paths, labels, names = _scan_folder(src)
    elif src.is_file():
        ds = list_dataset(src)
        paths, labels, names = ds.paths, ds.labels.tolist(), [str(c) for c in ds.classes]
    else:
        raise DataError(f"{src}: neither an image folder nor a list file")
    if not paths:
        raise DataError(f"{src}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    return paths, labels, names


def pack_images(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    resize: int = 0,
    quality: int = 0,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
    align: AlignOptions | None = None,
) -> dict[str, Any]:
    """Packs an image folder (``identity/*.jpg``) or a ``path,label`` list file.

    With ``align`` (folders only), the images are first aligned by :func:`.align.align_folder`
    into a temporary folder inside ``out_dir`` (removed afterwards), and that folder is packed;
    the alignment report is written to ``out_dir/align_report.json`` and images skipped for
    want of a face are not packed (identities left without images are dropped).

    Identities get labels 0..C-1 in sorted folder-name (or sorted list-label) order. The
    original file bytes are stored unless ``resize`` or ``quality`` asks for re-encoding.
    Every image is decoded once to check it (an undecodable file is an error naming it).

    Returns:
        Summary: num_classes, num_images, height, width, and (for folders) the class names.
    """
    if align is not None:
        if not Path(source).is_dir():
            raise DataError(f"{source}: --align needs an image folder, not a list file")
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="aligned-", dir=out_dir) as tmp:
            report = align_folder(source, tmp, align, workers=workers, progress=progress)
            Path(tmp, "align_report.json").replace(Path(out_dir) / "align_report.json")
            summary = pack_images(tmp, out_dir, resize=resize, quality=quality, workers=workers)
        return {**summary, "align": report["counts"]}
    paths, labels, names = list_sources(source)
    order = sorted(range(len(paths)), key=lambda i: labels[i])  # stable: grouped by identity
    jobs = [(paths[i], resize, quality) for i in order]
    writer = InsightFacePackWriter(out_dir, len(paths), len(names))
    shape: tuple[int, int] | None = None
    for i, (payload, h, w) in zip(order, _ordered_map(_load_for_pack, jobs, workers)):
        writer.add(labels[i], payload)
        shape = shape or (h, w)
        if progress:
            progress(1)
    writer.close(*shape)
    out = Path(out_dir)
    (out / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    return {
        "num_classes": len(names),
        "num_images": len(paths),
        "height": shape[0],
        "width": shape[1],
        "out": str(out),
    }


# ---------------------------------------------------------------------------------------------
# inspect / stats / unpack / verify


def _pair(rec: str | os.PathLike, idx: str | os.PathLike | None):
    rec = Path(rec)
    if rec.is_dir():
        rec = rec / "train.rec"
    if idx is None and rec.with_suffix(".idx").is_file():
        idx = rec.with_suffix(".idx")
    return rec, idx


def inspect_records(
    rec: str | os.PathLike, idx: str | os.PathLike | None = None, limit: int = 0
) -> Iterator[dict[str, Any]]:
    """One dict per record: key, flag, label, id, id2, payload_len, payload_sha256."""
    rec, idx = _pair(rec, idx)
    reader = RecordIOReader(rec, idx)
    for n, (key, record) in enumerate(reader):
        if limit and n >= limit:
            return
        header, payload = unpack(record, path=str(rec), key=key)
        label = header.label.tolist() if header.flag > 0 else float(header.label)
        yield {
            "key": key,
            "flag": header.flag,
            "label": label,
            "id": header.id,
            "id2": header.id2,
            "payload_len": len(payload),
            "payload_sha256": hashlib.sha256(payload).hexdigest(),
        }


def dataset_stats(rec: str | os.PathLike, idx: str | os.PathLike | None = None) -> dict[str, Any]:
    """Identities, images and a histogram of images per identity."""
    rec, idx = _pair(rec, idx)
    ds = RecordDataset(rec, idx)
    counts = np.bincount(ds.labels, minlength=ds.num_classes)
    edges = [1, 2, 6, 11, 21, 51, 101, 201, 501, 1001]
    hist = {}
    for lo, hi in zip(edges, edges[1:] + [None]):
        n = int(np.sum((counts >= lo) & ((counts < hi) if hi else True)))
        hist[f"{lo}-{hi - 1}" if hi else f">={lo}"] = n
    return {
        "file": str(rec),
        "header_record": ds.has_header,
        "identities": ds.num_classes,
        "images": len(ds),
        "images_per_identity": {
            "min": int(counts.min()),
            "median": float(np.median(counts)),
            "mean": round(float(counts.mean()), 3),
            "max": int(counts.max()),
        },
        "histogram": hist,
    }


def _extension(payload: bytes) -> str:
    if payload[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if payload[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if payload[:2] == b"BM":
        return ".bmp"
    return ".bin"


def unpack_to_folder(
    rec: str | os.PathLike,
    out_dir: str | os.PathLike,
    idx: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Writes every image as ``out_dir/<identity>/<key>.<ext>`` with its stored bytes."""
    rec, idx = _pair(rec, idx)
    ds = RecordDataset(rec, idx)
    out = Path(out_dir)
    width = len(str(max(int(ds.classes[-1]), 0)))
    for i, key in enumerate(ds.keys.tolist()):
        _, payload = unpack(ds.reader.read(key), path=str(rec), key=key)
        folder = out / f"{int(ds.classes[ds.labels[i]]):0{width}d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{key}{_extension(payload)}").write_bytes(payload)
        if progress:
            progress(1)
    return {"images": len(ds), "identities": ds.num_classes, "out": str(out)}


def verify_pack(
    rec: str | os.PathLike, idx: str | os.PathLike | None = None, *, decode_images: bool = True
) -> tuple[int, list[str]]:
    """:func:`.recordio.verify` plus the InsightFace layout (header and identity ranges)."""
    rec, idx = _pair(rec, idx)
    n, problems = verify(rec, idx, decode_images=decode_images)
    messages = [str(p) for p in problems]
    if not problems and idx is not None:
        reader = RecordIOReader(rec, idx)
        header, payload = (
            unpack(reader.read(0), path=str(rec), key=0) if 0 in reader else (None, b"")
        )
        if header is not None and header.flag > 0 and not payload:
            lo, hi = (int(v) for v in header.label[:2])
            for key in range(lo, hi):
                if key not in reader:
                    messages.append(
                        f"{rec} key {key}: identity record named by the header "
                        "is missing from the index"
                    )
                    continue
                h, _ = unpack(reader.read(key), path=str(rec), key=key)
                start, stop = (int(v) for v in h.label[:2]) if h.flag >= 2 else (0, -1)
                if not 1 <= start <= stop <= lo:
                    messages.append(
                        f"{rec} key {key}: identity range {h.label} is not within "
                        f"the image keys 1..{lo - 1}"
                    )
    return n, messages
