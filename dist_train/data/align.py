"""Face alignment onto the ArcFace 5-point template.

Owns: the ArcFace 112x112 template (scaled for other sizes), the least-squares similarity
transform of 5 landmarks onto it, the warp (:func:`align_face`), the YuNet detector wrapper
(:class:`YuNetDetector`, OpenCV's ``cv2.FaceDetectorYN``), the rule that picks one face among
several (:func:`choose_face`), the landmarks-file readers (:func:`read_landmarks`) and the folder
operation behind ``launch/align.py`` (:func:`align_folder`, which writes ``align_report.json``).
Does not own: packing aligned images (:mod:`.packing` calls :func:`align_folder`).

Landmark order everywhere: right eye, left eye, nose tip, right mouth corner, left mouth corner
of the person (the right eye is on the image's left), as (x, y) in image pixels.
"""

from __future__ import annotations

import csv
import json
import multiprocessing as mp
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .datasets import IMAGE_EXTENSIONS
from .errors import DataError

ARCFACE_TEMPLATE_112 = np.array(
    [
        [38.2946, 51.6963],  # right eye
        [73.5318, 51.5014],  # left eye
        [56.0252, 71.7366],  # nose tip
        [41.5493, 92.3655],  # right mouth corner
        [70.7299, 92.2041],  # left mouth corner
    ],
    dtype=np.float64,
)
"""InsightFace's ``arcface_dst``: the 5 points of a 112x112 aligned face, (x, y) in pixels."""

CHOICE_RULES = ("center", "largest", "score")
MISS_ACTIONS = ("skip", "center")


class AlignError(DataError):
    """A bad landmarks file, detector model, folder or option (names the file and line)."""


def arcface_template(size: int = 112) -> np.ndarray:
    """The template for a ``size`` x ``size`` crop: the 112 template scaled by ``size / 112``.

    Returns:
        [5, 2] float64.
    """
    return ARCFACE_TEMPLATE_112 * (float(size) / 112.0)


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity (rotation, uniform scale, translation) taking ``src`` onto ``dst``.

    Umeyama (1991), closed form, no reflection: minimises ``sum |s R src_i + t - dst_i|^2``.
    Deterministic (no sampling, unlike ``cv2.estimateAffinePartial2D``).

    Args:
        src: [N, 2] points (N >= 2), e.g. detected landmarks.
        dst: [N, 2] target points, e.g. :func:`arcface_template`.

    Returns:
        [2, 3] float64 matrix M with ``dst ~ M @ [x, y, 1]``, for ``cv2.warpAffine``.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
    if src.shape != dst.shape or len(src) < 2:
        raise AlignError(f"need two [N>=2, 2] point sets of one shape, got {src.shape} {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s0, d0 = src - mu_s, dst - mu_d
    var_s = (s0**2).sum() / len(src)
    if var_s <= 0:
        raise AlignError("the source points all coincide")
    cov = d0.T @ s0 / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1.0
    rot = u @ e @ vt
    scale = float((sig * np.diag(e)).sum() / var_s)
    m = np.empty((2, 3), dtype=np.float64)
    m[:, :2] = scale * rot
    m[:, 2] = mu_d - scale * rot @ mu_s
    return m


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The ``size`` x ``size`` crop whose 5 points fall on the (scaled) ArcFace template.

    Args:
        image: [H, W, C] or [H, W] uint8.
        landmarks: [5, 2] (x, y) in the order of :data:`ARCFACE_TEMPLATE_112`.
        size: output side in pixels.

    Returns:
        [size, size, C] uint8; pixels from outside the image are black.
    """
    m = similarity_transform(landmarks, arcface_template(size))
    return cv2.warpAffine(image, m, (size, size), flags=cv2.INTER_LINEAR, borderValue=0)


def center_crop(image: np.ndarray, size: int = 112) -> np.ndarray:
    """The fallback for an image without a face: the central square, resized to ``size``."""
    h, w = image.shape[:2]
    side = min(h, w)
    y0, x0 = (h - side) // 2, (w - side) // 2
    square = image[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if size < side else cv2.INTER_LINEAR
    return cv2.resize(square, (size, size), interpolation=interp)


@dataclass(frozen=True)
class Face:
    """One detection: ``box`` (x, y, w, h), ``landmarks`` [5, 2], detector ``score``."""

    box: tuple[float, float, float, float]
    landmarks: np.ndarray
    score: float


class YuNetDetector:
    """OpenCV's YuNet (``cv2.FaceDetectorYN``): boxes, 5 landmarks and a score per face.

    The input size is set to each image's size, so landmarks are in the image's pixels.

    Args:
        model_path: the ``.onnx`` model (e.g. ``face_detection_yunet.onnx``).
        score_threshold: faces below this score are dropped.
        nms_threshold: IoU above which overlapping boxes are merged.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        score_threshold: float = 0.6,
        nms_threshold: float = 0.3,
    ):
        if not Path(model_path).is_file():
            raise AlignError(f"{model_path}: detector model not found")
        try:
            self._net = cv2.FaceDetectorYN.create(
                str(model_path), "", (320, 320), score_threshold, nms_threshold, 5000
            )
        except cv2.error as exc:
            raise AlignError(f"{model_path}: not a YuNet model ({exc.err})") from None

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in a BGR (or grey) uint8 image, in the detector's order."""
        if image.ndim == 2:
            image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        h, w = image.shape[:2]
        self._net.setInputSize((w, h))
        _, rows = self._net.detect(image)
        if rows is None:
            return []
        return [
            Face(
                tuple(float(v) for v in r[:4]),
                r[4:14].reshape(5, 2).astype(np.float64),
                float(r[14]),
            )
            for r in rows
        ]


def choose_face(faces: list[Face], image_shape: tuple[int, ...], rule: str = "center") -> int:
    """Index of the face to align among several.

    Rules:
        ``largest``: the largest box area.
        ``center``: box area weighted by closeness to the image centre,
            ``area * (1 - d / d_max) ** 2`` with ``d`` the distance from the box centre to the
            image centre and ``d_max`` half the image diagonal: a big face off to the side loses
            to a slightly smaller one in the middle, a small face in the middle loses to a big one.
        ``score``: the highest detector score.
    Ties go to the earlier face (the detector's order).
    """
    if not faces:
        raise AlignError("no faces to choose from")
    if rule not in CHOICE_RULES:
        raise AlignError(
            f"unknown face-choice rule {rule!r}; choose from {', '.join(CHOICE_RULES)}"
        )
    h, w = image_shape[:2]
    d_max = 0.5 * float(np.hypot(w, h))

    def key(f: Face) -> float:
        x, y, bw, bh = f.box
        if rule == "score":
            return f.score
        area = max(bw, 0.0) * max(bh, 0.0)
        if rule == "largest":
            return area
        d = float(np.hypot(x + bw / 2 - w / 2, y + bh / 2 - h / 2))
        return area * max(0.0, 1.0 - d / d_max) ** 2

    keys = [key(f) for f in faces]
    return int(max(range(len(faces)), key=lambda i: (keys[i], -i)))


# ---------------------------------------------------------------------------------------------
# landmarks files


def read_landmarks(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Landmarks per image path from a file, in one of two formats (chosen by content).

    CSV (comma-separated, ``.csv`` or any file whose first data line has commas):
        ``path,x1,y1,x2,y2,x3,y3,x4,y4,x5,y5``, points in :data:`ARCFACE_TEMPLATE_112` order;
        an optional header line (its second field is not a number) is skipped.
    InsightFace ``.lst`` (tab-separated, as read by InsightFace's ``face2rec2.py``):
        ``aligned<TAB>path<TAB>label<TAB>x0 y0 x1 y1 (box, 4 fields)<TAB>10 landmark fields``
        with the landmark fields as ``x1..x5`` then ``y1..y5``; lines without landmarks
        (3 or 7 fields) are skipped.

    Paths are returned as written (relative paths are relative to the image folder being aligned).

    Returns:
        {path: [5, 2] float64}.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise AlignError(f"{path}: cannot read landmarks file ({exc.strerror})") from None
    out: dict[str, np.ndarray] = {}
    data = [(n, ln) for n, ln in enumerate(lines, 1) if ln.strip() and not ln.startswith("#")]
    is_lst = bool(data) and "\t" in data[0][1] and "," not in data[0][1]
    for n, line in data:
        if is_lst:
            f = [v.strip() for v in line.strip().split("\t")]
            if len(f) in (3, 7):
                continue
            if len(f) != 17:
                raise AlignError(f"{path}:{n}: expected 17 tab-separated fields, got {len(f)}")
            key, vals = f[1], f[7:17]
        else:
            f = next(csv.reader([line]))
            if len(f) != 11:
                raise AlignError(f"{path}:{n}: expected path + 10 coordinates, got {len(f)} fields")
            key, vals = f[0].strip(), f[1:]
        try:
            nums = np.array([float(v) for v in vals], dtype=np.float64)
        except ValueError:
            if not is_lst and n == data[0][0]:
                continue  # header line
            raise AlignError(f"{path}:{n}: a coordinate is not a number") from None
        pts = nums.reshape(2, 5).T if is_lst else nums.reshape(5, 2)
        if key in out:
            raise AlignError(f"{path}:{n}: {key} listed twice")
        out[key] = pts
    return out


# ---------------------------------------------------------------------------------------------
# folders


@dataclass(frozen=True)
class AlignOptions:
    """How :func:`align_folder` finds and crops faces."""

    detector: str | None = None
    """YuNet ``.onnx`` path; None when every image is in ``landmarks``."""
    size: int = 112
    """Output side in pixels (the template is scaled by size / 112)."""
    choose: str = "center"
    """Rule among several faces (:func:`choose_face`)."""
    on_miss: str = "skip"
    """No face: ``skip`` (no output file) or ``center`` (central square crop)."""
    score_threshold: float = 0.6
    """Detector score below which a face is not counted."""
    jpeg_quality: int = 95
    """Quality of written JPEGs (PNG stays lossless)."""

    def __post_init__(self):
        if self.choose not in CHOICE_RULES:
            raise AlignError(f"choose: {self.choose!r} is not one of {', '.join(CHOICE_RULES)}")
        if self.on_miss not in MISS_ACTIONS:
            raise AlignError(f"on_miss: {self.on_miss!r} is not one of {', '.join(MISS_ACTIONS)}")
        if self.size < 8:
            raise AlignError(f"size: {self.size} is too small (at least 8)")


def list_images(src: str | os.PathLike) -> list[str]:
    """Image paths under ``src`` relative to it, sorted, with ``/`` separators (any depth)."""
    root = Path(src)
    if not root.is_dir():
        raise AlignError(f"{root}: not a folder")
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


_worker: dict[str, Any] = {}


def _init_worker(opts: AlignOptions, landmarks: dict[str, np.ndarray]) -> None:
    cv2.setNumThreads(1)
    _worker["opts"] = opts
    _worker["landmarks"] = landmarks
    _worker["detector"] = (
        YuNetDetector(opts.detector, opts.score_threshold) if opts.detector else None
    )


def _encode(image: np.ndarray, suffix: str, quality: int) -> bytes:
    params = [cv2.IMWRITE_JPEG_QUALITY, quality] if suffix in (".jpg", ".jpeg") else []
    ok, enc = cv2.imencode(suffix, image, params)
    if not ok:
        raise AlignError(f"encoding as {suffix} failed")
    return enc.tobytes()


def align_one(src_root: str, rel: str) -> tuple[dict[str, Any], bytes | None]:
    """(report entry, encoded aligned image or None) of one file, in a worker set up by
    :func:`_init_worker`."""
    opts: AlignOptions = _worker["opts"]
    path = Path(src_root) / rel
    suffix = path.suffix.lower()
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return {"status": "unreadable", "reason": "not a decodable image"}, None
    entry: dict[str, Any]
    pts = _worker["landmarks"].get(rel)
    if pts is not None:
        entry = {"status": "found", "source": "landmarks file", "faces": 1}
    elif _worker["detector"] is None:
        entry = {"status": "missed", "reason": "not in the landmarks file and no detector"}
    else:
        faces = _worker["detector"].detect(image)
        if not faces:
            entry = {"status": "missed", "reason": f"no face with score >= {opts.score_threshold}"}
        else:
            i = choose_face(faces, image.shape, opts.choose)
            f = faces[i]
            pts = f.landmarks
            entry = {
                "status": "found",
                "source": "detector",
                "faces": len(faces),
                "box": [round(v, 2) for v in f.box],
                "score": round(f.score, 4),
            }
    if pts is not None:
        entry["landmarks"] = [[round(float(x), 2), round(float(y), 2)] for x, y in pts]
        out = align_face(image, pts, opts.size)
        entry["action"] = "aligned"
    elif opts.on_miss == "center":
        out = center_crop(image, opts.size)
        entry["action"] = "center crop"
    else:
        entry["action"] = "skipped"
        return entry, None
    return entry, _encode(out, suffix, opts.jpeg_quality)


def _align_job(job: tuple[str, str]) -> tuple[dict[str, Any], bytes | None]:
    return align_one(*job)


def _ordered_map(fn: Callable, jobs: list, workers: int, initargs: tuple) -> Iterator:
    if workers <= 1:
        _init_worker(*initargs)
        yield from map(fn, jobs)
        return
    # forkserver: a forked copy of OpenCV's thread pool deadlocked workers (see packing.py)
    ctx = mp.get_context("forkserver" if os.name == "posix" else "spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=initargs) as pool:
        yield from pool.imap(fn, jobs, chunksize=max(1, min(16, len(jobs) // (workers * 8))))


def align_folder(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    opts: AlignOptions,
    *,
    landmarks_file: str | os.PathLike | None = None,
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Aligns every image under ``src`` into ``dst`` (same relative paths and suffixes).

    Landmarks come from ``landmarks_file`` where it lists the image (paths relative to ``src``,
    or absolute), otherwise from the detector, which picks one face by ``opts.choose``. An image
    without landmarks is handled by ``opts.on_miss`` and always listed in the report. The output
    depends only on the inputs and options (not on ``workers``).

    Returns:
        The report, also written to ``dst/align_report.json``: ``counts`` (images, found, missed,
        multi_face, unreadable, written) and ``files`` ({relative path: entry}).
    """
    if opts.detector is None and landmarks_file is None:
        raise AlignError("need a detector model or a landmarks file")
    src_root, out = Path(src), Path(dst)
    rels = list_images(src_root)
    if not rels:
        raise AlignError(f"{src_root}: no images found ({', '.join(IMAGE_EXTENSIONS)})")
    marks: dict[str, np.ndarray] = {}
    if landmarks_file is not None:
        for key, pts in read_landmarks(landmarks_file).items():
            p = Path(key)
            if p.is_absolute():
                try:
                    key = p.resolve().relative_to(src_root.resolve()).as_posix()
                except ValueError:
                    continue  # an image outside src
            marks[Path(key).as_posix()] = pts
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, Any] = {}
    counts = dict.fromkeys(("images", "found", "missed", "multi_face", "unreadable", "written"), 0)
    jobs = [(str(src_root), rel) for rel in rels]
    for rel, (entry, payload) in zip(rels, _ordered_map(_align_job, jobs, workers, (opts, marks))):
        counts["images"] += 1
        counts[entry["status"]] += 1
        counts["multi_face"] += int(entry.get("faces", 0) > 1)
        if payload is not None:
            target = out / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(payload)
            counts["written"] += 1
        files[rel] = entry
        if progress:
            progress(1)
    report = {
        "source": str(src_root),
        "options": {
            "size": opts.size,
            "choose": opts.choose,
            "on_miss": opts.on_miss,
            "score_threshold": opts.score_threshold,
            "detector": Path(opts.detector).name if opts.detector else None,
            "landmarks_file": str(landmarks_file) if landmarks_file else None,
        },
        "counts": counts,
        "files": files,
    }
    (out / "align_report.json").write_text(json.dumps(report, indent=1) + "\n")
    return report
