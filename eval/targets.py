"""Verification targets: InsightFace ``.bin`` sets, labelled pair lists and unlabelled test lists.

Owns reading a target file into a :class:`VerificationTarget` (a list of images plus index
pairs and, when known, the same/different labels) and decoding its images to uint8 RGB.
It does not embed images (:mod:`eval.extract`) nor compute metrics (:mod:`eval.metrics`).

Formats:
    * ``*.bin`` (LFW, CFP-FP, CFP-FF, AgeDB-30, CALFW, CPLFW): a pickle of
      ``(bins, issame_list)`` where ``bins`` holds ``2P`` encoded images (JPEG/PNG bytes; pair
      ``i`` is ``bins[2i], bins[2i+1]``) and ``issame_list`` ``P`` booleans. Read by
      :func:`load_bin` with a restricted unpickler: only lists, tuples, bytes, str, bools,
      ints and numpy bool/uint8 arrays can be built, so a hostile file cannot run code.
    * Labelled pair list (``*.csv`` / ``*.txt``): lines ``label,path1,path2`` with label 1 for
      "same" and 0 for "different" (comma- or whitespace-separated; blank lines, ``#``
      comments and a ``label,path1,path2`` header are skipped). Paths are relative to an
      images root, by default the list's directory; with a RecordIO ``.rec`` pack as the
      root, the fields are record keys instead (read with ``dist_train.data.recordio``).
    * Unlabelled test list: lines ``path1,path2``; the evaluator writes ``score,path1,path2``.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np


class TargetError(ValueError):
    """A target file that cannot be read; the message names the file (and line/record)."""


# --------------------------------------------------------------------------------------------
# Restricted unpickling of .bin files
# --------------------------------------------------------------------------------------------

# numpy arrays arrive through these names (module moved from numpy.core to numpy._core in 2.0).
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_NUMPY_NUMERIC = ("numpy.core.numeric", "numpy._core.numeric")
_ALLOWED_DTYPES = ("b1", "u1", "|b1", "|u1", "?", "bool", "uint8")


def _safe_reconstruct(cls, shape, dtype_code):
    """``numpy.core.multiarray._reconstruct`` restricted to building a plain ndarray."""
    if cls is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype=np.uint8)


def _safe_dtype(code, align=False, copy=False):
    """``numpy.dtype`` restricted to bool and uint8 (the only array types a .bin needs)."""
    text = code.decode("latin1") if isinstance(code, bytes) else code
    if text not in _ALLOWED_DTYPES:
        raise pickle.UnpicklingError(f"refusing numpy dtype {text!r}")
    return np.dtype(text, bool(align), bool(copy))


def _safe_frombuffer(buf, dtype, shape, order):
    """``numpy.core.numeric._frombuffer`` (protocol-5 arrays) restricted to bool / uint8."""
    if not isinstance(dtype, np.dtype) or dtype.str.lstrip("|") not in ("b1", "u1"):
        raise pickle.UnpicklingError(f"refusing numpy array of dtype {dtype!r}")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"refusing array order {order!r}")
    return np.frombuffer(bytes(buf), dtype=dtype).reshape(shape, order=order)


def _safe_scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` restricted to bool / uint8 values."""
    if not isinstance(dtype, np.dtype) or dtype.str.lstrip("|") not in ("b1", "u1"):
        raise pickle.UnpicklingError(f"refusing numpy scalar of dtype {dtype!r}")
    if not isinstance(data, bytes):
        raise pickle.UnpicklingError("numpy scalar payload must be bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _safe_codecs_encode(text, encoding="utf-8"):
    """``_codecs.encode``, which Python 3 protocol-2 pickles use for ``bytes`` objects."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("refusing _codecs.encode other than (str, 'latin1')")
    return codecs.encode(text, "latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _safe_codecs_encode,
    ("__builtin__", "bytearray"): bytearray,
    ("builtins", "bytearray"): bytearray,
    **{(m, "_reconstruct"): _safe_reconstruct for m in _NUMPY_MODULES},
    **{(m, "scalar"): _safe_scalar for m in _NUMPY_MODULES},
    **{(m, "_frombuffer"): _safe_frombuffer for m in _NUMPY_NUMERIC},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _safe_dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only plain containers, bytes, str, numbers, bools and bool/uint8 arrays."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in a .bin verification set"
            ) from None


def _restricted_load(data: bytes):
    # encoding="bytes" turns Python 2 ``str`` images into bytes (InsightFace's files are
    # Python 2 pickles); it leaves Python 3 pickles unchanged.
    return _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()


def _as_image_bytes(item, path: str, index: int) -> bytes:
    if isinstance(item, bytes | bytearray):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()  # cv2.imencode's buffer pickled without .tobytes()
    raise TargetError(f"{path}: image {index} is a {type(item).__name__}, expected bytes")


def load_bin(path: str) -> tuple[list[bytes], np.ndarray]:
    """Reads an InsightFace ``.bin`` verification set without executing any code from it.

    Args:
        path: the ``.bin`` file.

    Returns:
        ``(bins, issame)``: ``2P`` encoded images and a ``[P]`` bool array.

    Raises:
        TargetError: the file is missing, is not a pickle, asks for anything beyond plain
            containers / bytes / bools (e.g. a callable such as ``os.system``), or its shapes
            disagree.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TargetError(f"{path}: cannot read verification set ({exc})") from exc
    try:
        obj = _restricted_load(data)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as exc:
        raise TargetError(
            f"{path}: not a safe .bin verification set ({exc}); only lists of image bytes and "
            "bools are accepted and nothing in the file was executed"
        ) from exc
    if not isinstance(obj, tuple | list) or len(obj) != 2:
        raise TargetError(f"{path}: expected a pickled (bins, issame_list) pair")
    raw_bins, raw_issame = obj
    if not isinstance(raw_bins, list | tuple):
        raise TargetError(f"{path}: bins must be a list, got {type(raw_bins).__name__}")
    bins = [_as_image_bytes(b, path, i) for i, b in enumerate(raw_bins)]
    issame_arr = np.asarray(raw_issame)
    if issame_arr.ndim != 1 or not (
        issame_arr.dtype == np.bool_ or np.isin(issame_arr, (0, 1)).all()
    ):
        raise TargetError(f"{path}: issame_list must be a flat list of bools")
    issame = issame_arr.astype(bool)
    if len(bins) != 2 * len(issame):
        raise TargetError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (expected {2 * len(issame)})"
        )
    return bins, issame


def save_bin(path: str, bins: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Writes ``(list of encoded images, list of bools)`` in the InsightFace ``.bin`` layout."""
    with open(path, "wb") as f:
        pickle.dump(([bytes(b) for b in bins], [bool(s) for s in issame]), f, protocol=4)


# --------------------------------------------------------------------------------------------
# Images and targets
# --------------------------------------------------------------------------------------------


def decode_image(
    data: bytes, image_size: int | None, where: str, center_crop: int = 0
) -> np.ndarray:
    """Encoded image -> ``[3, S, S]`` uint8 RGB, prepared as the training data were.

    Args:
        data: the encoded bytes.
        image_size: resize to this side when the (cropped) image differs (None: keep).
        where: names the image in errors.
        center_crop: first take the central ``center_crop`` square (``data.center_crop``; 0 off).

    The decoder, crop and resize are the training pipeline's own (:mod:`dist_train.data`:
    area averaging when shrinking, bilinear when growing).
    """
    from dist_train.data.datasets import decode_rgb
    from dist_train.data.transforms import center_crop as crop
    from dist_train.data.transforms import resize

    img = decode_rgb(data)  # the training decoder (TurboJPEG for JPEGs, else OpenCV)
    if img is None:
        raise TargetError(f"{where}: cannot decode image")
    if center_crop:
        img = crop(img, center_crop)
    if image_size is not None and img.shape[:2] != (image_size, image_size):
        img = resize(img, image_size)
    return np.ascontiguousarray(img.transpose(2, 0, 1))


class RecordImage(NamedTuple):
    """An image stored as record ``key`` of a RecordIO pack (``rec``; its ``.idx`` beside it)."""

    rec: str
    key: int


def _open_pack(rec: str):
    """A ``RecordIOReader`` for ``rec`` (and ``rec``'s ``.idx`` when it exists)."""
    try:
        from dist_train.data.recordio import RecordIOReader
    except ImportError as exc:  # the data package provides the reader
        raise TargetError(f"{rec}: RecordIO packs need dist_train.data.recordio") from exc
    idx = os.path.splitext(rec)[0] + ".idx"
    return RecordIOReader(rec, idx if os.path.isfile(idx) else None)


@dataclass
class VerificationTarget:
    """Images plus index pairs of one verification set.

    Attributes:
        name: short name used in reports and metric keys (the file stem, e.g. ``"lfw"``).
        path: the file it came from.
        sources: ``N`` images, each encoded bytes (``.bin``), a file path (pair lists over a
            folder) or a :class:`RecordImage` (pair lists over a RecordIO pack).
        pairs: ``[P, 2]`` int64 indices into ``sources``.
        issame: ``[P]`` bool labels, or None for an unlabelled test list.
        pair_names: for pair lists, the two paths of each pair as written in the list.
    """

    name: str
    path: str
    sources: list = field(repr=False)
    pairs: np.ndarray = field(repr=False)
    issame: np.ndarray | None = field(default=None, repr=False)
    pair_names: list[tuple[str, str]] | None = field(default=None, repr=False)
    _packs: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _keys: list | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def labelled(self) -> bool:
        return self.issame is not None

    @property
    def num_images(self) -> int:
        return len(self.sources)

    @property
    def num_pairs(self) -> int:
        return int(self.pairs.shape[0])

    def encoded(self, i: int) -> tuple[bytes, str]:
        """``(encoded bytes, description for errors)`` of image ``i``."""
        src = self.sources[i]
        if isinstance(src, bytes):
            return src, f"{self.path}: image {i}"
        if isinstance(src, RecordImage):
            return self._record(src), f"{src.rec}: key {src.key}"
        try:
            with open(src, "rb") as f:
                return f.read(), f"{self.path}: image {src}"
        except OSError as exc:
            raise TargetError(f"{self.path}: cannot read image {src} ({exc})") from exc

    def content_keys(self) -> list[bytes]:
        """A digest of each image's encoded bytes (computed once), to share work across targets."""
        if self._keys is None:
            self._keys = [
                hashlib.blake2b(self.encoded(i)[0], digest_size=16).digest()
                for i in range(self.num_images)
            ]
        return self._keys

    def load_images(
        self, start: int, stop: int, image_size: int | None = None, center_crop: int = 0
    ) -> np.ndarray:
        """Images ``start:stop`` as ``[n, 3, S, S]`` uint8 RGB (see :func:`decode_image`)."""
        out = []
        for i in range(start, stop):
            data, where = self.encoded(i)
            out.append(decode_image(data, image_size, where, center_crop))
        if not out:
            size = image_size or 112
            return np.zeros((0, 3, size, size), dtype=np.uint8)
        shapes = {im.shape for im in out}
        if len(shapes) > 1:
            raise TargetError(
                f"{self.path}: images have different sizes {sorted(shapes)}; pass image_size"
            )
        return np.stack(out)

    def _record(self, src: RecordImage) -> bytes:
        from dist_train.data.recordio import unpack

        if src.rec not in self._packs:
            self._packs[src.rec] = _open_pack(src.rec)
        _, payload = unpack(self._packs[src.rec].read(src.key), path=src.rec, key=src.key)
        return payload


def bin_target(path: str, name: str | None = None) -> VerificationTarget:
    """A ``.bin`` set as a target (pair ``i`` = images ``2i`` and ``2i+1``).

    Byte-identical images (the same photo used by several pairs) are kept once, so each is
    embedded once; ``pairs`` maps every pair side to its image.
    """
    bins, issame = load_bin(path)
    index: dict[bytes, int] = {}
    sides = np.fromiter(
        (index.setdefault(b, len(index)) for b in bins), dtype=np.int64, count=len(bins)
    )
    unique = list(index)  # dicts keep insertion order: unique[k] has index k
    return VerificationTarget(
        _stem(path) if name is None else name, path, unique, sides.reshape(-1, 2), issame
    )


def _split_line(line: str) -> list[str]:
    return [p.strip() for p in line.split(",")] if "," in line else line.split()


def pair_list_target(
    path: str, images_root: str | None = None, name: str | None = None
) -> VerificationTarget:
    """A labelled (``label,path1,path2``) or unlabelled (``path1,path2``) pair list.

    Every distinct image path is embedded once however many pairs use it.

    Args:
        path: the list file.
        images_root: directory the image paths are relative to (default: the list's
            directory), or a RecordIO ``.rec`` pack whose record keys the list names instead of
            paths (its ``.idx`` is used when it sits beside it).
        name: report name (default: the file stem).
    """
    root = os.path.dirname(os.path.abspath(path)) if images_root is None else images_root
    pack = _open_pack(root) if root.endswith(".rec") else None
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TargetError(f"{path}: cannot read pair list ({exc})") from exc
    index: dict[str, int] = {}
    sources: list[str] = []
    pairs: list[tuple[int, int]] = []
    labels: list[bool] = []
    names: list[tuple[str, str]] = []
    width = None
    for lineno, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        parts = _split_line(text)
        if lineno == 1 and parts and parts[0].lower() in ("label", "path1"):
            continue  # header row
        if len(parts) not in (2, 3):
            raise TargetError(
                f"{path}:{lineno}: expected 'label,path1,path2' or 'path1,path2', got {text!r}"
            )
        if width is None:
            width = len(parts)
        elif len(parts) != width:
            raise TargetError(f"{path}:{lineno}: {len(parts)} fields, earlier lines had {width}")
        if width == 3:
            if parts[0] not in ("0", "1"):
                raise TargetError(f"{path}:{lineno}: label must be 0 or 1, got {parts[0]!r}")
            labels.append(parts[0] == "1")
            parts = parts[1:]
        ids = []
        for rel in parts:
            if rel not in index:
                index[rel] = len(sources)
                sources.append(_pair_source(path, lineno, root, rel, pack))
            ids.append(index[rel])
        pairs.append((ids[0], ids[1]))
        names.append((parts[0], parts[1]))
    if not pairs:
        raise TargetError(f"{path}: no pairs found")
    return VerificationTarget(
        name=_stem(path) if name is None else name,
        path=path,
        sources=sources,
        pairs=np.asarray(pairs, dtype=np.int64),
        issame=np.asarray(labels, dtype=bool) if width == 3 else None,
        pair_names=names,
    )


def _pair_source(path: str, lineno: int, root: str, rel: str, pack) -> str | RecordImage:
    """The image a pair-list field names: a file under ``root`` or a record key of ``pack``."""
    if pack is not None:
        try:
            key = int(rel)
        except ValueError:
            raise TargetError(
                f"{path}:{lineno}: {rel!r} is not a record key of {root} (integers expected)"
            ) from None
        if key not in pack:
            raise TargetError(f"{path}:{lineno}: key {key} is not in {root}")
        return RecordImage(root, key)
    full = rel if os.path.isabs(rel) else os.path.join(root, rel)
    if not os.path.isfile(full):
        raise TargetError(f"{path}:{lineno}: image {full} does not exist")
    return full


def load_target(
    path: str, images_root: str | None = None, name: str | None = None
) -> VerificationTarget:
    """Reads a ``.bin`` set or a pair list (by extension: ``.bin`` else a text pair list).

    Args:
        path: target file.
        images_root: for pair lists, the directory image paths are relative to.
        name: report name (default: the file stem).
    """
    if not os.path.exists(path):
        raise TargetError(f"{path}: verification target does not exist")
    if path.endswith(".bin"):
        return bin_target(path, name)
    return pair_list_target(path, images_root, name)


def write_scores(path: str, target: VerificationTarget, scores: np.ndarray) -> None:
    """Writes ``score,path1,path2`` lines (one per pair, in list order)."""
    if target.pair_names is None:
        raise TargetError(f"{target.path}: scores files are written for pair lists only")
    if len(scores) != target.num_pairs:
        raise ValueError(f"{len(scores)} scores for {target.num_pairs} pairs")
    with open(path, "w", encoding="utf-8") as f:
        f.write("score,path1,path2\n")
        for s, (a, b) in zip(scores, target.pair_names):
            f.write(f"{float(s):.6f},{a},{b}\n")


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
