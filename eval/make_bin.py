"""Verification sets from pairs files: LFW's ``pairs.txt`` or a labelled pair list -> ``.bin``.

Owns reading LFW's ``pairs.txt`` (:func:`read_lfw_pairs`), choosing the stored bytes of each
image (:func:`encode_for_bin`) and building an InsightFace ``.bin`` from either pairs format
(:func:`make_bin`). Labelled pair lists are read by the project's one pair-list parser
(:func:`eval.targets.parse_pair_list`) and the file is written by its one writer
(:func:`eval.targets.save_bin`).

Formats:
    * LFW ``pairs.txt``: a header line ``folds n`` (or a single count ``n``, as in
      ``pairsDevTrain.txt``), then per fold ``n`` same-person lines ``name i j`` and ``n``
      different-person lines ``name1 i name2 j`` (tab- or space-separated); image ``i`` of
      ``name`` is ``DIR/name/name_%04d.jpg``. The line count must match the header.
    * Labelled pair list: ``label,path1,path2`` (see :mod:`eval.targets`), paths relative to
      the images directory.

Stored images: a JPEG or PNG that is already ``size x size`` is stored as its original bytes
(no re-encode). Any other image is decoded with the training decoder
(``dist_train.data.datasets.decode_image``), resized to ``size x size`` with the evaluation
transform's resize (``dist_train.data.transforms.resize``: area averaging when shrinking,
bilinear when growing; the aspect ratio is not kept) and encoded losslessly as PNG
(``encode="png"``, the default: the ``.bin`` then holds exactly the pixels the evaluator feeds
the network for the pair list at ``image_size=size``) or as JPEG of quality 95
(``encode="jpeg"``: about 5x smaller files, lossy). Pair order is kept, so the 10-fold split of
the ``.bin`` is the official one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

from dist_train.data.datasets import DataError, decode_image
from dist_train.data.transforms import resize
from eval.targets import TargetError, parse_pair_list, save_bin

JPEG_QUALITY = 95
ENCODINGS = ("png", "jpeg")


@dataclass(frozen=True)
class BinPair:
    """One pair of a pairs file: two image files, the label and where it was written."""

    where: str
    """``file:line`` of the pair, for messages."""
    first: str
    second: str
    issame: bool


def is_lfw_pairs(path: str | os.PathLike) -> bool:
    """Whether ``path`` is an LFW ``pairs.txt`` (its first non-blank line is 1 or 2 integers)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if parts:
                    return len(parts) in (1, 2) and all(p.isdigit() for p in parts)
    except OSError as exc:
        raise TargetError(f"{path}: cannot read pairs file ({exc})") from exc
    return False


def read_lfw_pairs(path: str | os.PathLike, images: str | os.PathLike) -> list[BinPair]:
    """The pairs of an LFW ``pairs.txt``, in file order, with their image paths under ``images``.

    Raises:
        TargetError: a malformed header or line, an index that is not a positive integer, or a
            pair count that disagrees with the header (messages name ``path:line``). The images
            are not checked here.
    """
    path, images = os.fspath(path), os.fspath(images)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise TargetError(f"{path}: cannot read pairs file ({exc})") from exc
    numbered = [(i, ln.split()) for i, ln in enumerate(lines, start=1) if ln.strip()]
    if not numbered:
        raise TargetError(f"{path}: empty pairs file")
    head_line, head = numbered[0]
    if len(head) not in (1, 2) or not all(p.isdigit() for p in head):
        raise TargetError(
            f"{path}:{head_line}: expected a header 'folds n' (or 'n'), got {' '.join(head)!r}"
        )
    folds, n = (1, int(head[0])) if len(head) == 1 else (int(head[0]), int(head[1]))

    def image(name: str, index: str, lineno: int) -> str:
        if not index.isdigit() or int(index) < 1:
            raise TargetError(f"{path}:{lineno}: image number {index!r} is not a positive integer")
        return os.path.join(images, name, f"{name}_{int(index):04d}.jpg")

    out = []
    for lineno, parts in numbered[1:]:
        if len(parts) == 3:
            name, i, j = parts
            first, second, same = image(name, i, lineno), image(name, j, lineno), True
        elif len(parts) == 4:
            first, second = image(parts[0], parts[1], lineno), image(parts[2], parts[3], lineno)
            same = False
        else:
            raise TargetError(
                f"{path}:{lineno}: expected 'name i j' or 'name1 i name2 j', got "
                f"{' '.join(parts)!r}"
            )
        out.append(BinPair(f"{path}:{lineno}", first, second, same))
    if len(out) != 2 * folds * n:
        raise TargetError(
            f"{path}: the header says {folds} fold(s) of {n} same + {n} different pairs "
            f"({2 * folds * n} lines) but there are {len(out)} pair lines"
        )
    return out


def read_labelled_pairs(path: str | os.PathLike, images: str | os.PathLike) -> list[BinPair]:
    """The pairs of a labelled ``label,path1,path2`` list, paths resolved under ``images``.

    Raises:
        TargetError: what :func:`eval.targets.parse_pair_list` raises, or an unlabelled list.
    """
    path, images = os.fspath(path), os.fspath(images)
    lines = parse_pair_list(path)
    if lines[0].label is None:
        raise TargetError(f"{path}:{lines[0].lineno}: a .bin needs labels ('label,path1,path2')")
    return [
        BinPair(
            f"{path}:{ln.lineno}",
            os.path.join(images, ln.first),
            os.path.join(images, ln.second),
            bool(ln.label),
        )
        for ln in lines
    ]


def read_pairs(path: str | os.PathLike, images: str | os.PathLike | None = None) -> list[BinPair]:
    """LFW ``pairs.txt`` or labelled pair list (told apart by the first line) -> pairs.

    ``images`` defaults to the pairs file's directory.
    """
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path)) if images is None else os.fspath(images)
    if is_lfw_pairs(path):
        return read_lfw_pairs(path, root)
    return read_labelled_pairs(path, root)


def _kind(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return "other"


def encode_for_bin(data: bytes, size: int, where: str, encode: str = "png") -> bytes:
    """The bytes a ``.bin`` stores for one encoded image (see the module docstring).

    Args:
        data: the image file's bytes.
        size: the stored side length.
        where: names the image in errors.
        encode: ``"png"`` (lossless) or ``"jpeg"`` (quality 95) for images that are resized.

    Raises:
        TargetError: the bytes are not a decodable image, or encoding failed.
    """
    try:
        img = decode_image(data, where=where)
    except DataError as exc:
        raise TargetError(str(exc)) from None
    if img.shape[:2] == (size, size) and _kind(data) in ENCODINGS:
        return data
    img = cv2.cvtColor(resize(img, size), cv2.COLOR_RGB2BGR)
    if encode == "png":
        ok, buf = cv2.imencode(".png", img)
    else:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise TargetError(f"{where}: {encode} encoding failed")
    return buf.tobytes()


def make_bin(
    pairs_path: str | os.PathLike,
    out: str | os.PathLike,
    images: str | os.PathLike | None = None,
    *,
    size: int = 112,
    encode: str = "png",
    progress: Callable[[int], object] | None = None,
) -> dict:
    """Writes the ``.bin`` of a pairs file (LFW ``pairs.txt`` or a labelled pair list).

    Args:
        pairs_path: the pairs file.
        out: the ``.bin`` to write.
        images: the images directory (default: the pairs file's directory).
        size: stored side length of resized images.
        encode: ``"png"`` or ``"jpeg"`` for images that need resizing.
        progress: called with 1 after each pair.

    Returns:
        A summary: ``pairs``, ``same``, ``images`` (distinct files), ``kept`` (stored as their
        original bytes), ``reencoded`` and ``out``.

    Raises:
        TargetError: a malformed pairs file or a missing or undecodable image (naming the
            pairs file and line, and the image).
    """
    if encode not in ENCODINGS:
        raise ValueError(f"encode must be one of {', '.join(ENCODINGS)}, got {encode!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    pairs = read_pairs(pairs_path, images)
    stored: dict[str, bytes] = {}
    kept = 0
    bins: list[bytes] = []
    for pair in pairs:
        for file in (pair.first, pair.second):
            if file not in stored:
                try:
                    with open(file, "rb") as f:
                        data = f.read()
                except OSError as exc:
                    raise TargetError(
                        f"{pair.where}: cannot read image {file} ({exc.strerror})"
                    ) from None
                stored[file] = encode_for_bin(data, size, f"{pair.where}: image {file}", encode)
                kept += stored[file] is data
            bins.append(stored[file])
        if progress is not None:
            progress(1)
    issame = [p.issame for p in pairs]
    save_bin(os.fspath(out), bins, issame)
    return {
        "out": os.fspath(out),
        "pairs": len(pairs),
        "same": int(np.sum(issame)),
        "images": len(stored),
        "kept": kept,
        "reencoded": len(stored) - kept,
    }
