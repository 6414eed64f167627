"""Verification targets: InsightFace ``.bin`` sets, labelled pair lists and unlabelled test lists.

Owns the project's one reader of each verification format (:func:`load_bin`,
:func:`read_pair_list`), the names of the standard ``.bin`` sets (:data:`STANDARD_SETS`,
:func:`known_bins`), reading a target file into a :class:`VerificationTarget` (a list of
images plus index pairs and, when known, the same/different labels), and preparing its images
as training's evaluation path does: the training decoder
(``dist_train.data.datasets.decode_image``) and evaluation transform
(``dist_train.data.transforms.EvalTransform``). It does not embed images (:mod:`eval.extract`)
nor compute metrics (:mod:`eval.metrics`). The synthetic generator writes ``.bin`` files with
:func:`save_bin`'s layout.

Formats:
    * ``*.bin`` (LFW, CFP-FP, CFP-FF, AgeDB-30, CALFW, CPLFW): a pickle of
      ``(bins, issame_list)`` where ``bins`` holds ``2P`` encoded images (JPEG/PNG bytes; pair
      ``i`` is ``bins[2i], bins[2i+1]``) and ``issame_list`` ``P`` booleans. Read by
      :func:`load_bin` with a restricted unpickler: only lists, tuples, bytes, str, bools,
      ints and numpy bool/uint8 arrays can be built, so a hostile file cannot run code.
    * Labelled pair list (``*.csv`` / ``*.txt``): lines ``label,path1,path2`` with label 1 for
      "same" and 0 for "different" (comma- or whitespace-separated; blank lines, ``#``
      comments and a ``label,path1,path2`` header are skipped; comma-separated lines may
      quote fields as CSV does). Paths are relative to an images root, by default the list's
      directory; with a RecordIO ``.rec`` pack as the root, the fields are record keys
      instead (read with ``dist_train.data.recordio``).
    * Unlabelled test list: lines ``path1,path2``; the evaluator writes ``score,path1,path2``.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from dist_train.data.datasets import DataError, decode_image
from dist_train.data.transforms import EvalTransform


class TargetError(DataError):
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


def prepare_image(data: bytes, where: str, transform: EvalTransform | None = None) -> np.ndarray:
    """Encoded image -> ``[3, S, S]`` uint8 RGB, prepared as training's evaluation path does.

    Args:
        data: the encoded bytes.
        where: names the image in errors.
        transform: the training evaluation transform (center crop, resize, low light; see
            :meth:`eval.options.EvalOptions.transform`); None keeps the decoded pixels.

    Raises:
        TargetError: the bytes are not a decodable image (names ``where``).
    """
    try:
        img = decode_image(data, where=where)  # the training decoder
    except DataError as exc:
        raise TargetError(str(exc)) from None
    if transform is not None:
        img = transform(img)
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
        self, start: int, stop: int, transform: EvalTransform | None = None
    ) -> np.ndarray:
        """Images ``start:stop`` as ``[n, 3, S, S]`` uint8 RGB (see :func:`prepare_image`)."""
        out = []
        for i in range(start, stop):
            data, where = self.encoded(i)
            out.append(prepare_image(data, where, transform))
        if not out:
            size = (transform.image_size if transform is not None else None) or 112
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


class PairLine(NamedTuple):
    """One pair of a pair list, as written."""

    lineno: int
    """Line number in the list (1-based), for messages."""
    label: bool | None
    """True for "same", False for "different", None in an unlabelled list."""
    first: str
    second: str


def _split_line(line: str) -> list[str]:
    if "," in line:
        return [p.strip() for p in next(csv.reader([line]))]
    return line.split()


def parse_pair_list(path: str | os.PathLike) -> list[PairLine]:
    """Reads a labelled (``label,path1,path2``) or unlabelled (``path1,path2``) pair list.

    This is the one reader of the format (see the module docstring); the fields are returned
    as written, neither resolved nor checked.

    Raises:
        TargetError: the file cannot be read, a line has the wrong number of fields or a label
            other than 0/1, labelled and unlabelled lines are mixed, or there is no pair
            (messages name ``path:line``).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8", newline="") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TargetError(f"{path}: cannot read pair list ({exc})") from exc
    out: list[PairLine] = []
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
        label = None
        if width == 3:
            if parts[0] not in ("0", "1"):
                raise TargetError(f"{path}:{lineno}: label must be 0 or 1, got {parts[0]!r}")
            label = parts[0] == "1"
            parts = parts[1:]
        out.append(PairLine(lineno, label, parts[0], parts[1]))
    if not out:
        raise TargetError(f"{path}: no pairs found")
    return out


def read_pair_list(
    path: str | os.PathLike, root: str | os.PathLike | None = None
) -> tuple[list[tuple[Path, Path]], np.ndarray | None]:
    """A pair list's image paths and labels (:func:`parse_pair_list` resolved as paths).

    Args:
        path: the list file.
        root: directory relative paths are resolved against (default: the list's directory).

    Returns:
        ``(pairs, issame)``: ``P`` pairs of paths and ``[P]`` bool labels, or None for an
        unlabelled list. The images are not checked (:func:`pair_list_target` does).
    """
    base = Path(root) if root is not None else Path(path).parent
    lines = parse_pair_list(path)
    pairs = [
        tuple(p if p.is_absolute() else base / p for p in (Path(ln.first), Path(ln.second)))
        for ln in lines
    ]
    if lines[0].label is None:
        return pairs, None
    return pairs, np.asarray([ln.label for ln in lines], dtype=bool)


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
    lines = parse_pair_list(path)
    index: dict[str, int] = {}
    sources: list = []
    pairs: list[tuple[int, int]] = []
    for line in lines:
        ids = []
        for rel in (line.first, line.second):
            if rel not in index:
                index[rel] = len(sources)
                sources.append(_pair_source(path, line.lineno, root, rel, pack))
            ids.append(index[rel])
        pairs.append((ids[0], ids[1]))
    labelled = lines[0].label is not None
    return VerificationTarget(
        name=_stem(path) if name is None else name,
        path=path,
        sources=sources,
        pairs=np.asarray(pairs, dtype=np.int64),
        issame=np.asarray([ln.label for ln in lines], dtype=bool) if labelled else None,
        pair_names=[(ln.first, ln.second) for ln in lines],
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


STANDARD_SETS = ("lfw", "cfp_fp", "agedb_30", "calfw", "cplfw")
"""The five verification sets face papers report and average, as InsightFace names its ``.bin``
files (the report's ``mean`` row covers these only)."""

KNOWN_SETS = (*STANDARD_SETS, "cfp_ff", "vgg2_fp")
"""Every ``.bin`` set :func:`known_bins` looks for, in the order papers list them."""


def known_bins(directory: str) -> list[str]:
    """The ``<name>.bin`` files of :data:`KNOWN_SETS` present in ``directory``, in that order.

    Raises:
        TargetError: ``directory`` is not a directory or holds none of them (names it).
    """
    if not os.path.isdir(directory):
        raise TargetError(f"{directory}: verification set directory does not exist")
    found = [
        os.path.join(directory, f"{n}.bin")
        for n in KNOWN_SETS
        if os.path.isfile(os.path.join(directory, f"{n}.bin"))
    ]
    if not found:
        raise TargetError(f"{directory}: holds none of {', '.join(n + '.bin' for n in KNOWN_SETS)}")
    return found


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
