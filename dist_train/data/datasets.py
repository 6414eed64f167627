"""Training datasets and the train-data builder.

Owns: the InsightFace RecordIO layout (with or without the header record; scalar or array
labels), image folders (``identity/*.jpg``), ``path,label`` list files, contiguous labels
0..C-1, decoding to RGB (:func:`decode_image`: TurboJPEG for JPEGs, OpenCV otherwise; the
evaluator decodes with it too), the batch fill of the loader, and choosing the dataset from a
``DataConfig``. Does not own: the RecordIO byte format, samplers, transforms, the DataLoader
(:mod:`.loader`), nor verification sets (``.bin`` files and pair lists are read by
``eval.targets``). Imports no torch (DataLoader only needs ``__getitem__``/``__len__``).

Every dataset opens its files lazily in the process that reads, so each DataLoader worker
has its own handles (fork- and spawn-safe).

Why one module of this size: the three dataset kinds share :class:`LabelledImages` (labels,
decoding, the loader's batch fill) and the builder that picks one of them from the config.
"""

from __future__ import annotations

import csv
import logging
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .errors import DataError
from .recordio import IR_SIZE, MAGIC, RecordIOError, RecordIOReader, unpack
from .transforms import SampleRandom, preset_draws, preset_randoms, resize

log = logging.getLogger(__name__)

_HEAD = struct.Struct("<III")  # magic, length-and-flag word, the IRHeader's flag
_LEN_MASK = (1 << 29) - 1

try:  # libjpeg-turbo's TurboJPEG API: JPEG decoding straight into a batch row
    from simplejpeg import decode_jpeg as _sj_decode
except ImportError:  # pragma: no cover - a declared dependency; OpenCV does everything without
    _sj_decode = None

# OpenCV >= 4.10 decodes straight to RGB, saving a full-image colour conversion per sample.
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def decode_image(buf: bytes, *, where: str = "<bytes>") -> np.ndarray:
    """JPEG/PNG/... bytes -> ``[H, W, 3]`` uint8 RGB, with the decoder of :func:`decode_rgb`.

    Raises:
        DataError: the bytes are not a decodable image (names ``where``).
    """
    img = decode_rgb(buf)
    if img is None:
        raise DataError(f"{where}: {len(buf)}-byte payload is not a decodable image")
    return img


def _decode_cv(data) -> np.ndarray | None:
    """OpenCV decode of any image format to ``[H, W, 3]`` RGB; None when undecodable."""
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _IMREAD_RGB) if len(data) else None
    if img is None:
        return None
    if img.ndim == 2:  # only an 8-bit gray decode can come back 2-D
        return cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
    return img if _IMREAD_RGB != cv2.IMREAD_COLOR else cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_rgb(data, out: np.ndarray | None = None) -> np.ndarray | None:
    """Encoded image bytes (any buffer) -> ``[H, W, 3]`` uint8 RGB, or None if undecodable.

    JPEGs go through libjpeg-turbo's TurboJPEG API (``simplejpeg``): the same library and
    default settings as OpenCV's decoder (the pixels are identical; tests pin it), less
    overhead per call, and the image can be written straight into ``out`` -- a row of a batch
    -- with no copy. Anything else (PNG, BMP, CMYK or damaged JPEGs, images larger than
    ``out``) goes through OpenCV.

    Args:
        data: the encoded bytes (``bytes``, ``memoryview`` or uint8 array).
        out: optional contiguous uint8 array to decode into; the returned array is a view of
            it when used (check its shape: a smaller image fills only the front of ``out``).
    """
    if _sj_decode is not None and _is_jpeg(data):
        try:
            return _sj_decode(data, "RGB", buffer=out)
        except ValueError:  # damaged, CMYK, or larger than ``out``
            if out is not None:
                try:
                    return _sj_decode(data, "RGB")
                except ValueError:
                    pass
    return _decode_cv(data)


def _is_jpeg(data) -> bool:
    return len(data) > 3 and data[0] == 0xFF and data[1] == 0xD8


def _contiguous(raw: np.ndarray, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Labels mapped onto 0..C-1 (sorted raw values) and the raw value of each class."""
    if len(raw) == 0:
        raise DataError(f"{source}: no images found")
    classes, labels = np.unique(raw, return_inverse=True)
    if len(classes) != int(classes[-1]) + 1 or classes[0] != 0:
        log.warning(
            "%s: labels are not contiguous 0..C-1 (%d distinct values in [%d, %d]); "
            "they are remapped in sorted order",
            source,
            len(classes),
            classes[0],
            classes[-1],
        )
    return labels.astype(np.int64), classes


class LabelledImages:
    """Base class: ``labels [N]`` int64 in 0..C-1, ``load(i) -> RGB uint8`` and a transform.

    ``__getitem__`` takes an index or ``(index, seed...)`` (the sampler's per-sample seed, so
    augmentation does not depend on the worker that draws it) and returns
    ``(image [H, W, 3] uint8 RGB numpy, label int)``; the loader's collate makes the batch
    ``[B, 3, H, W]``.
    """

    labels: np.ndarray
    classes: np.ndarray
    transform: Any = None
    base_seed: int = 0
    _into_rows: bool = True  # fill() decodes JPEGs straight into the batch (until sizes differ)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def _payloads(self, rows: list[int]):
        """``(i, encoded bytes or None)`` for each of ``rows``; None sends the batch loop of
        :meth:`fill` to ``load(i)`` (which raises the precise error for damaged data)."""
        return ((i, None) for i in rows)

    def __getitem__(self, item):
        if isinstance(item, tuple):
            i, seed = item[0], item[1:]
        else:
            i, seed = item, (0,)
        img = self.load(int(i))
        if self.transform is not None:
            img = self.transform(img, SampleRandom(self.base_seed, *seed))
        return img, int(self.labels[i])

    def fill(self, items: list, out: np.ndarray) -> np.ndarray:
        """Decode and augment a batch straight into ``out``; what ``__getitem__`` gives per item.

        The batch path of the training loader: one call per batch, the samples' random draws
        computed together (:func:`preset_draws`, equal to the per-sample ``SampleRandom``), each
        result written into its row of ``out`` (no per-sample arrays to stack later).

        Args:
            items: ``B`` indices, ``(index, seed...)`` tuples with seeds of one length, or
                those tuples as the rows of an integer array ``[B, 1 + k]``.
            out: ``[>= B, S, S, 3]`` uint8, ``S`` the transform's ``image_size``.

        Returns:
            int64 labels ``[B]``.
        """
        transform = self.transform
        if transform is None or not hasattr(transform, "image_size"):
            raise TypeError(f"fill() needs a sized transform, got {transform!r}")
        if isinstance(items, np.ndarray) and items.ndim == 2:
            index, seeds = items[:, 0].astype(np.int64), items[:, 1:].astype(np.int64)
        elif len(items) and isinstance(items[0], tuple):
            arr = np.array(items, dtype=np.int64)
            index, seeds = arr[:, 0], arr[:, 1:]
        else:
            index = np.asarray(items, dtype=np.int64).reshape(-1)
            seeds = np.zeros((len(index), 1), np.int64)  # __getitem__'s default seed (0,)
        keys = np.empty((len(index), 1 + seeds.shape[1]), np.uint64)
        keys[:, 0] = int(self.base_seed) & ((1 << 64) - 1)
        keys[:, 1:] = seeds.view(np.uint64)
        size = transform.image_size
        if not out.flags.c_contiguous:  # rows are written through reshaped views of ``out``
            raise ValueError("fill() needs a C-contiguous output array")
        rows = index.tolist()
        if not transform.flip_only:
            # every draw the transform can make, vectorised (a crop that needs several attempts
            # would otherwise continue its stream in Python)
            rngs = preset_randoms(keys, max(1, transform.max_draws))
            # one decode buffer for the batch (it stays in the CPU cache; a fresh array per
            # image costs about a quarter of a decode here); grown for larger images
            scratch = np.empty(out[0].size, np.uint8)
            for j, (i, data) in enumerate(self._payloads(rows)):
                img = decode_rgb(data, out=scratch) if data is not None else None
                if img is not None and img.size > scratch.size:
                    scratch = np.empty(img.size, np.uint8)  # did not fit: the next ones will
                if img is None:
                    img = self.load(i)
                transform(img, rngs[j], out=out[j])
            return self.labels[index]
        # Resize and flip only (the recipes' augmentation): an unflipped JPEG of the right size
        # is decoded straight into its row of the batch. A flipped one is decoded as BGR into a
        # scratch image whose rows are then byte-reversed into the batch row: reversing the
        # bytes of a BGR row gives the mirrored RGB row, and a one-channel flip is faster than
        # a three-channel one (the flip is the copy).
        if transform.hflip:  # the transform's one draw: flip when < 0.5
            flips = (preset_draws(keys, 1)[0][:, 0] < 0.5).tolist()
        else:
            flips = [False] * len(rows)
        scratch = np.empty(out.shape[1:], np.uint8)
        shape, turbo, flip = scratch.shape, _sj_decode if self._into_rows else None, cv2.flip
        flat = (shape[0], shape[1] * shape[2])
        scratch_rows, out_rows = scratch.reshape(flat), out.reshape(len(out), *flat)
        for j, (i, data) in enumerate(self._payloads(rows)):
            row = out[j]
            if turbo is not None and data is not None and data[0] == 0xFF and data[1] == 0xD8:
                # the hot path, inlined
                try:
                    if flips[j]:
                        img = turbo(data, "BGR", buffer=scratch)
                    else:
                        img = turbo(data, "RGB", buffer=row)
                except ValueError:  # damaged, CMYK or larger than the row: the general path
                    img = None
                if img is not None and img.shape == shape:
                    if flips[j]:
                        flip(scratch_rows, 1, dst=out_rows[j])
                    continue
                turbo = None  # not stored at the training size: stop trying (for this call)
            img = decode_rgb(data) if data is not None else None
            if img is None:
                img = self.load(i)
            if img.shape != shape:
                img = resize(img, size)
                self._into_rows, turbo = False, None  # the data are not at the training size
            if flips[j]:
                flip(img, 1, dst=row)
            else:
                row[...] = img
        return self.labels[index]


class RecordDataset(LabelledImages):
    """InsightFace-layout ``train.rec``/``train.idx``.

    If record 0 has ``flag > 0`` and an empty payload it is a header: image keys are
    ``1 .. label[0]-1`` (records after them describe identity ranges). Otherwise every key is
    an image. The identity is the
    header's label, or its first element for array labels.
    """

    def __init__(
        self, rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None, transform=None
    ):
        self.rec_path = Path(rec_path)
        if idx_path is None:
            cand = self.rec_path.with_suffix(".idx")
            idx_path = cand if cand.is_file() else None
        self.reader = RecordIOReader(self.rec_path, idx_path)
        self.transform = transform
        self.memory_map = True
        """Read through a memory map of the ``.rec`` (False: one ``pread`` per record)."""
        keys = self.reader.keys
        self.has_header = False
        if 0 in self.reader:
            header, payload = unpack(self.reader.read(0), path=str(self.rec_path), key=0)
            # InsightFace's header record: flag > 0 and no image. (Checking the empty payload
            # too keeps a pack without header whose first image has array labels working.)
            if header.flag > 0 and not payload:
                self.has_header = True
                stop = int(header.label[0])
                image_keys = [k for k in range(1, stop)]
                missing = [
                    k
                    for k in image_keys[:: max(1, len(image_keys) // 1000)]
                    if k not in self.reader
                ]
                if stop < 2 or missing:
                    raise DataError(
                        f"{self.rec_path}: header record 0 says image keys 1..{stop - 1} but "
                        f"{'none' if stop < 2 else f'key {missing[0]}'} is in the index"
                    )
                keys = image_keys
        self.keys = np.asarray(keys, dtype=np.int64)
        raw = self._read_labels()
        self.labels, self.classes = _contiguous(raw, str(self.rec_path))
        self._check_property()
        self._fast_tables()

    def _read_labels(self) -> np.ndarray:
        """Label of every image from its header alone (one small read per record)."""
        reader = self.reader
        fd = reader._handle()
        size = reader.size
        out = np.empty(len(self.keys), dtype=np.float64)
        seg = struct.Struct("<II")
        ir = struct.Struct("<If")
        for n, key in enumerate(self.keys.tolist()):
            off = reader.offset(key)
            head = os.pread(fd, 8 + IR_SIZE + 4, off) if off < size else b""
            fast = len(head) == 8 + IR_SIZE + 4
            if fast:
                magic, lrec = seg.unpack_from(head)
                # a whole first segment holding the header and one label: read in place
                length = lrec & ((1 << 29) - 1)
                fast = (
                    magic == MAGIC
                    and lrec >> 29 == 0
                    and length >= IR_SIZE + 4
                    and off + 8 + ((length + 3) & ~3) <= size  # a truncated record fails here
                )
            if fast:
                flag, label = ir.unpack_from(head, 8)
                if flag > 0:
                    label = struct.unpack_from("<f", head, 8 + IR_SIZE)[0]
            else:  # short, split or damaged record: the full reader gives the precise error
                header, _ = unpack(reader.read(key), path=str(self.rec_path), key=key)
                label = header.label if header.flag == 0 else header.label[0]
            out[n] = label
        if not np.all(np.isfinite(out)) or np.any(out < 0) or np.any(out != np.round(out)):
            bad = int(np.flatnonzero(~np.isfinite(out) | (out < 0) | (out != np.round(out)))[0])
            raise DataError(
                f"{self.rec_path} key {int(self.keys[bad])}: label {out[bad]} is not a "
                "non-negative integer identity"
            )
        return out.astype(np.int64)

    def _check_property(self) -> None:
        prop = self.rec_path.parent / "property"
        if prop.is_file():
            try:
                declared = int(prop.read_text().split(",")[0])
            except ValueError:
                log.warning("%s: cannot parse 'num_classes,H,W'", prop)
                return
            if declared != self.num_classes:
                log.warning(
                    "%s says %d classes but %s holds %d",
                    prop,
                    declared,
                    self.rec_path,
                    self.num_classes,
                )

    def _fast_tables(self) -> None:
        """Byte offset and span of every image as int64 arrays (numpy, not lists of Python
        ints: forked workers share the pages instead of copying them on refcount writes)."""
        self.reader._span(0)  # builds the reader's offset -> next-offset table
        nxt = self.reader._next
        offsets = np.fromiter(
            (self.reader.offset(int(k)) for k in self.keys), np.int64, len(self.keys)
        )
        ends = np.fromiter((nxt.get(int(o), 0) for o in offsets), np.int64, len(offsets))
        spans = ends - offsets
        spans[(spans <= 0) | (spans > 64 << 20)] = 0
        self._offsets_arr, self._spans_arr = offsets, spans

    def load(self, i: int) -> np.ndarray:
        data = next(self._payloads([i]))[1]
        img = decode_rgb(data) if data is not None else None
        return img if img is not None else self._load_slow(i)

    def mapped_view(self) -> memoryview | None:
        """This process's read-only memory map of the ``.rec`` file (None where it cannot be
        mapped or ``memory_map`` is off: the reads then use ``pread``). Mapped lazily in each
        process, like the handle."""
        if not self.memory_map:
            return None
        mapped = self.__dict__.get("_mapped")
        if mapped is None or mapped[0] != os.getpid():
            try:  # the view keeps the map open
                view = memoryview(mmap.mmap(self.reader._handle(), 0, access=mmap.ACCESS_READ))
            except (OSError, ValueError):  # e.g. a file system without mmap support
                view = None
            mapped = self._mapped = (os.getpid(), view)
        return mapped[1]

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_mapped", None)  # a memory map does not pickle (spawned workers map again)
        return state

    def _payloads(self, rows: list[int]):
        # Fast path: the record's header parsed in place in the file's memory map and the
        # payload handed out as a view of it (no copy, no system call per record; measured 3-4%
        # more loader throughput than one pread per record). Anything unusual (split record,
        # damage, unknown span) yields None: the caller falls back to ``load``, whose full
        # reader raises the precise error. Reading a mapped page past the end of a file that
        # was truncated after it was opened would kill the process (SIGBUS), so the size is
        # checked once per call: a shrunken file is an error naming it.
        view, head = self.mapped_view(), _HEAD
        fd = self.reader._handle()
        if view is not None and (now := os.fstat(fd).st_size) < len(view):
            raise RecordIOError(
                self.rec_path, f"file shrank from {len(view)} to {now} bytes while open"
            )
        offsets = self._offsets_arr[rows].tolist()
        spans = self._spans_arr[rows].tolist()
        for i, off, span in zip(rows, offsets, spans, strict=True):
            if span >= 8 + IR_SIZE:
                if view is not None:
                    buf, base = view, off
                else:
                    buf, base = memoryview(os.pread(fd, span, off)), 0
                if base + span <= len(buf):
                    magic, lrec, flag = head.unpack_from(buf, base)
                    length = lrec & _LEN_MASK
                    start = 8 + IR_SIZE + 4 * flag
                    if (
                        magic == MAGIC
                        and lrec >> 29 == 0
                        and IR_SIZE <= length <= span - 8
                        and start <= 8 + length
                    ):
                        yield i, buf[base + start : base + 8 + length]
                        continue
            yield i, None

    def _load_slow(self, i: int) -> np.ndarray:
        key = int(self.keys[i])
        _, payload = unpack(self.reader.read(key), path=str(self.rec_path), key=key)
        try:
            return decode_image(payload)
        except DataError:
            where = f"{self.rec_path} key {key} at byte offset {self.reader.offset(key)}"
            raise DataError(
                f"{where}: {len(payload)}-byte payload is not a decodable image"
            ) from None


class FileListDataset(LabelledImages):
    """Images listed as ``(path, raw_label)``; labels mapped onto 0..C-1 in sorted order."""

    def __init__(self, paths: list[Path], raw_labels, source: str, transform=None):
        self.paths = [str(p) for p in paths]
        self.labels, self.classes = _contiguous(np.asarray(raw_labels), source)
        self.transform = transform

    def load(self, i: int) -> np.ndarray:
        buf = self._read(i)
        img = decode_rgb(buf)
        if img is None:
            raise DataError(f"{self.paths[i]}: {len(buf)}-byte file is not a decodable image")
        return img

    def _read(self, i: int) -> bytes:
        try:
            return Path(self.paths[i]).read_bytes()
        except OSError as exc:
            raise DataError(f"{self.paths[i]}: cannot read ({exc.strerror})") from None

    def _payloads(self, rows: list[int]):
        return ((i, self._read(i)) for i in rows)


def folder_dataset(root: str | os.PathLike, transform=None) -> FileListDataset:
    """``root/identity/*.jpg``: one class per sub-folder, classes in sorted name order."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: image folder does not exist")
    paths, labels = [], []
    names = sorted(d.name for d in root.iterdir() if d.is_dir())
    for c, name in enumerate(names):
        files = sorted(f for f in (root / name).iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        paths += files
        labels += [c] * len(files)
    ds = FileListDataset(paths, labels, str(root), transform)
    ds.class_names = names
    return ds


def list_dataset(list_file: str | os.PathLike, transform=None) -> FileListDataset:
    """A ``path,label`` file (relative paths are relative to the file's directory)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        raise DataError(f"{list_file}: list file does not exist")
    paths, labels = [], []
    with open(list_file, newline="") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip() or row[0].startswith("#"):
                continue
            try:
                if len(row) != 2:
                    raise ValueError
                label = int(row[1])
                if label < 0:
                    raise ValueError
            except ValueError:
                if lineno == 1:  # a header line such as "path,label"
                    continue
                raise DataError(
                    f"{list_file} line {lineno}: expected 'path,label' with a non-negative "
                    f"integer label, got {','.join(row)[:100]!r}"
                ) from None
            p = Path(row[0].strip())
            paths.append(p if p.is_absolute() else list_file.parent / p)
            labels.append(label)
    return FileListDataset(paths, labels, str(list_file), transform)


# ---------------------------------------------------------------------------------------------
# Choosing the dataset


def open_train_dataset(cfg, transform=None) -> LabelledImages:
    """The dataset described by ``cfg.root``/``cfg.format`` (``DataConfig``)."""
    root = Path(cfg.root)
    fmt = cfg.format
    if fmt == "auto":
        if root.is_file():
            fmt = "recordio" if root.suffix == ".rec" else "list"
        elif (root / "train.rec").is_file():
            fmt = "recordio"
        elif root.is_dir():
            fmt = "folder"
        else:
            raise DataError(f"data.root={str(root)!r} does not exist")
    if fmt == "recordio":
        rec = root if root.suffix == ".rec" else root / "train.rec"
        if not rec.is_file():
            raise DataError(f"{rec}: RecordIO file does not exist (data.format=recordio)")
        return RecordDataset(rec, transform=transform)
    if fmt == "folder":
        return folder_dataset(root, transform)
    if fmt == "list":
        return list_dataset(root, transform)
    raise DataError(f"unknown data.format {fmt!r}")


__all__ = [
    "DataError",
    "FileListDataset",
    "RecordDataset",
    "RecordIOError",
    "decode_image",
    "folder_dataset",
    "list_dataset",
    "open_train_dataset",
]
