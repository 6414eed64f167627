"""Synthetic face-like identities: the project's built-in default data set.

Owns: drawing identities and their images with OpenCV/numpy, and writing a training pack in
the InsightFace RecordIO layout plus a held-out verification set (LFW-style ``.bin`` and a
labelled pair-list CSV beside an image folder). Does not own: the RecordIO format
(:mod:`dist_train.data.recordio`) or reading the data back (:mod:`dist_train.data.datasets`).

Each identity is a fixed set of traits drawn from its own seed: head shape and skin colour,
hair colour and style, eye spacing/size/colour, brow shape, nose, mouth, a forehead mark of
its own shape and colour, moles, glasses, beard. Each image of it varies what a camera
varies: pose (rotation, yaw-like shift of the inner features), scale and position, expression
(eye opening, smile), background clutter, lighting gain and gradient, colour cast, blur,
noise, partial occlusion and JPEG quality. ``difficulty`` scales the per-image variation
(0: canonical images, :data:`DEFAULT_DIFFICULTY` by default, 1: strong, 2: very hard).
Raw-pixel similarity does not separate the identities (tested), while a small network
learns them in minutes.

Everything is deterministic from ``(seed, identity index, image index)``, independent of the
number of worker processes.

Why one module of this size: most of it is the drawing of one face (``_draw_face``), whose
steps consume one random stream in a fixed order; keeping them together keeps that order, on
which every seeded data set and test depends, visible in one place.
"""

from __future__ import annotations

import csv
import json
import math
import multiprocessing as mp
import os
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from .recordio import IRHeader, RecordIOWriter, pack

_SHIFT = 4  # cv2 sub-pixel bits: coordinates are passed multiplied by 16
_ONE = 1 << _SHIFT

DEFAULT_DIFFICULTY = 0.6
"""Raw-pixel cosine verifies at about 0.66 here, while a small CNN learns it in minutes."""

# Seed streams, so that identity traits and per-image nuisances never share random numbers.
_TRAITS, _IMAGE, _PAIRS = 1, 2, 3


@dataclass
class SyntheticSpec:
    """What :func:`make_synthetic` writes."""

    num_identities: int = 500
    """Training identities (classes)."""
    images_per_identity: int = 20
    """Training images per identity."""
    val_identities: int = 100
    """Held-out identities of the verification set (disjoint from training)."""
    val_images_per_identity: int = 10
    """Images drawn per held-out identity."""
    val_pairs: int = 1000
    """Verification pairs, half same and half different identity (rounded down to even)."""
    image_size: int = 112
    """Side of the square images in pixels."""
    seed: int = 0
    """Seed of everything."""
    difficulty: float = DEFAULT_DIFFICULTY
    """Scale of the per-image variation (0 = none, 1 = strong, 2 = very hard)."""
    jpeg_quality: int = 90
    """Upper JPEG quality; each image uses a quality in [quality - 15*difficulty, quality]."""

    def __post_init__(self) -> None:
        if self.num_identities < 2 or self.images_per_identity < 1:
            raise ValueError("need at least 2 identities and 1 image per identity")
        if self.val_pairs and (self.val_identities < 2 or self.val_images_per_identity < 2):
            raise ValueError("verification pairs need >= 2 val identities with >= 2 images")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if self.difficulty < 0:
            raise ValueError(f"difficulty must be >= 0, got {self.difficulty}")


# ---------------------------------------------------------------------------------------------
# Identity traits


def identity_traits(seed: int, identity: int) -> dict[str, Any]:
    """Persistent traits of one identity (colours as BGR floats, geometry in face units).

    Face units: the head's half-height is about 0.42 of the image side; positions are
    relative to the head centre in units of the image side.
    """
    r = np.random.default_rng([seed, _TRAITS, identity])
    u = r.uniform
    skin = np.array([u(60, 200), u(90, 215), u(120, 245)])  # BGR, warm-ish but varied
    hair = r.uniform(10, 230, 3) * np.array([1.0, 0.9, 1.0])
    return {
        "skin": skin,
        "hair": hair,
        "face_w": u(0.27, 0.37),
        "face_h": u(0.36, 0.45),
        "chin": u(0.85, 1.15),  # lower-half height factor
        "hair_h": u(0.04, 0.2),
        "hair_side": u(0.0, 0.35),
        "eye_y": u(-0.1, -0.02),
        "eye_dx": u(0.09, 0.16),
        "eye_r": u(0.028, 0.05),
        "eye_aspect": u(0.45, 0.95),
        "iris": r.uniform(0, 200, 3),
        "brow_gap": u(0.035, 0.075),
        "brow_tilt": u(-0.35, 0.35),
        "brow_thick": u(0.012, 0.03),
        "brow_len": u(0.05, 0.1),
        "nose_len": u(0.07, 0.15),
        "nose_w": u(0.02, 0.06),
        "mouth_y": u(0.14, 0.25),
        "mouth_w": u(0.06, 0.14),
        "mouth_curve": u(-0.035, 0.035),
        "lip": np.array([u(40, 140), u(40, 110), u(120, 220)]),
        "mark_shape": int(r.integers(0, 4)),  # none, circle, square, triangle
        "mark_color": r.uniform(0, 255, 3),
        "mark_xy": (u(-0.1, 0.1), u(-0.3, -0.2)),
        "mark_r": u(0.025, 0.05),
        "moles": [(u(-0.2, 0.2), u(-0.05, 0.25), u(0.007, 0.016)) for _ in range(r.integers(0, 4))],
        "glasses": bool(r.random() < 0.3),
        "glasses_color": r.uniform(0, 120, 3),
        "beard": bool(r.random() < 0.3),
        "beard_h": u(0.06, 0.14),
    }


# ---------------------------------------------------------------------------------------------
# Drawing


def _pt(x: float, y: float) -> tuple[int, int]:
    return int(round(x * _ONE)), int(round(y * _ONE))


def _ax(a: float, b: float) -> tuple[int, int]:
    return max(int(round(a * _ONE)), 1), max(int(round(b * _ONE)), 1)


def _col(c: np.ndarray) -> tuple[float, float, float]:
    return tuple(float(v) for v in np.clip(c, 0, 255))


def _background(r: np.random.Generator, s: int, difficulty: float) -> np.ndarray:
    """Random smooth gradient plus clutter shapes, so the background carries no identity."""
    c0, c1 = r.uniform(0, 255, 3), r.uniform(0, 255, 3)
    t = np.linspace(0.0, 1.0, s, dtype=np.float32)
    angle = r.uniform(0, 2 * math.pi)
    ramp = np.cos(angle) * t[None, :] + np.sin(angle) * t[:, None]
    ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
    img = c0[None, None, :] * (1 - ramp[..., None]) + c1[None, None, :] * ramp[..., None]
    img = img.astype(np.uint8)
    for _ in range(int(r.integers(0, 2 + int(4 * difficulty)))):
        color = _col(r.uniform(0, 255, 3))
        x, y = r.uniform(0, s, 2)
        if r.random() < 0.5:
            cv2.circle(
                img, _pt(x, y), int(r.uniform(0.05, 0.2) * s * _ONE), color, -1, cv2.LINE_AA, _SHIFT
            )
        else:
            w, h = r.uniform(0.05, 0.3, 2) * s
            cv2.rectangle(img, _pt(x, y), _pt(x + w, y + h), color, -1, cv2.LINE_AA, _SHIFT)
    return img


def _draw_face(t: dict[str, Any], r: np.random.Generator, s: int, d: float):
    """Face layer (BGR uint8) and its coverage mask (uint8), centred, before the pose warp."""
    face = np.zeros((s, s, 3), np.uint8)
    mask = np.zeros((s, s), np.uint8)
    cx, cy = s / 2, s / 2 + 0.03 * s
    fw, fh = t["face_w"] * s, t["face_h"] * s
    yaw = r.uniform(-1, 1) * min(d, 1.5)
    fw_eff = fw * (1 - 0.12 * abs(yaw))
    shift = yaw * 0.06 * s  # inner features move with the yaw, the outline does not
    skin = _col(t["skin"])
    hair = _col(t["hair"])

    def both(center, axes, start: int, end: int, colour) -> None:
        """A filled anti-aliased ellipse arc on the face (``colour``) and on the mask (255)."""
        for im, c in ((face, colour), (mask, 255)):
            cv2.ellipse(im, _pt(*center), _ax(*axes), 0, start, end, c, -1, cv2.LINE_AA, _SHIFT)

    # hair behind the head: a taller ellipse and optional side locks
    hh = t["hair_h"] * s
    both((cx, cy - hh * 0.6), (fw_eff * 1.08, fh * 0.9 + hh), 180, 360, hair)
    if t["hair_side"] > 0.05:
        side_h = t["hair_side"] * s
        for sx in (-1, 1):
            x0 = cx + sx * fw_eff * 0.95
            both((x0, cy), (fw_eff * 0.18, side_h), 0, 360, hair)
    # head: upper and lower half-ellipses (chin factor)
    both((cx, cy), (fw_eff, fh), 180, 360, skin)
    both((cx, cy), (fw_eff, fh * t["chin"]), 0, 180, skin)
    # fringe over the forehead
    cv2.ellipse(
        face,
        _pt(cx, cy - fh * 0.95),
        _ax(fw_eff * 0.95, hh * 0.8 + 0.02 * s),
        0,
        0,
        180,
        hair,
        -1,
        cv2.LINE_AA,
        _SHIFT,
    )
    if t["beard"]:
        cv2.ellipse(
            face,
            _pt(cx + shift * 0.5, cy + fh * t["chin"] * 0.75),
            _ax(fw_eff * 0.7, t["beard_h"] * s),
            0,
            0,
            360,
            hair,
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )

    fx = cx + shift
    # eyes: white, iris, openness varies per image
    open_ = 1.0 - r.uniform(0, 0.5) * min(d, 1.5)
    er = t["eye_r"] * s
    ey = cy + t["eye_y"] * s
    for sx in (-1, 1):
        ex = fx + sx * t["eye_dx"] * s
        cv2.ellipse(
            face,
            _pt(ex, ey),
            _ax(er, er * t["eye_aspect"] * open_),
            0,
            0,
            360,
            (235, 235, 235),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )
        cv2.circle(
            face,
            _pt(ex + yaw * er * 0.3, ey),
            int(er * 0.55 * min(open_ * 1.4, 1) * _ONE),
            _col(t["iris"]),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )
        # brows
        by = ey - t["brow_gap"] * s - er * 0.5
        bl = t["brow_len"] * s
        tilt = t["brow_tilt"] * sx
        p0 = _pt(ex - bl, by + tilt * bl * 0.5)
        p1 = _pt(ex + bl, by - tilt * bl * 0.5)
        cv2.line(face, p0, p1, hair, max(1, int(round(t["brow_thick"] * s))), cv2.LINE_AA, _SHIFT)
        if t["glasses"]:
            cv2.circle(
                face,
                _pt(ex, ey),
                int(er * 1.7 * _ONE),
                _col(t["glasses_color"]),
                max(1, s // 56),
                cv2.LINE_AA,
                _SHIFT,
            )
    if t["glasses"]:
        cv2.line(
            face,
            _pt(fx - t["eye_dx"] * s + er * 1.7, ey),
            _pt(fx + t["eye_dx"] * s - er * 1.7, ey),
            _col(t["glasses_color"]),
            max(1, s // 56),
            cv2.LINE_AA,
            _SHIFT,
        )
    # nose: a darker triangle
    nose = _col(t["skin"] * 0.7)
    nl, nw = t["nose_len"] * s, t["nose_w"] * s
    ny = ey + er
    tri = np.array([_pt(fx + yaw * 2, ny), _pt(fx - nw, ny + nl), _pt(fx + nw, ny + nl)], np.int32)
    cv2.fillConvexPoly(face, tri, nose, cv2.LINE_AA, _SHIFT)
    # mouth: a curve whose bend changes with expression
    my = cy + t["mouth_y"] * s
    mw = t["mouth_w"] * s
    curve = (t["mouth_curve"] + r.uniform(-0.02, 0.02) * min(d, 1.5)) * s
    xs = np.linspace(-1, 1, 9)
    pts = np.stack([fx + xs * mw, my + curve * (1 - xs**2)], 1)
    pts = np.round(pts * _ONE).astype(np.int32)
    cv2.polylines(face, [pts], False, _col(t["lip"]), max(1, s // 40), cv2.LINE_AA, _SHIFT)
    # forehead mark: the identity's own shape and colour
    mx, my_ = fx + t["mark_xy"][0] * s, cy + t["mark_xy"][1] * s
    mr = t["mark_r"] * s
    mc = _col(t["mark_color"])
    if t["mark_shape"] == 1:
        cv2.circle(face, _pt(mx, my_), int(mr * _ONE), mc, -1, cv2.LINE_AA, _SHIFT)
    elif t["mark_shape"] == 2:
        cv2.rectangle(
            face, _pt(mx - mr, my_ - mr), _pt(mx + mr, my_ + mr), mc, -1, cv2.LINE_AA, _SHIFT
        )
    elif t["mark_shape"] == 3:
        tri = np.array(
            [_pt(mx, my_ - mr), _pt(mx - mr, my_ + mr), _pt(mx + mr, my_ + mr)], np.int32
        )
        cv2.fillConvexPoly(face, tri, mc, cv2.LINE_AA, _SHIFT)
    for x, y, rad in t["moles"]:
        cv2.circle(
            face,
            _pt(fx + x * s, cy + y * s),
            int(max(rad * s, 0.8) * _ONE),
            (30, 35, 50),
            -1,
            cv2.LINE_AA,
            _SHIFT,
        )
    return face, mask


def render(traits: dict[str, Any], r: np.random.Generator, size: int, difficulty: float):
    """One image of an identity, BGR uint8 ``[size, size, 3]`` (OpenCV order, ready to encode)."""
    d = difficulty
    s = size
    face, mask = _draw_face(traits, r, s, d)
    angle = r.uniform(-18, 18) * d
    scale = 1.0 + r.uniform(-0.12, 0.12) * d
    tx, ty = r.uniform(-0.07, 0.07, 2) * d * s
    m = cv2.getRotationMatrix2D((s / 2, s / 2), angle, scale)
    m[:, 2] += (tx, ty)
    face = cv2.warpAffine(face, m, (s, s), flags=cv2.INTER_LINEAR)
    mask = cv2.warpAffine(mask, m, (s, s), flags=cv2.INTER_LINEAR)
    img = _background(r, s, d).astype(np.float32)
    alpha = mask.astype(np.float32)[..., None] * (1 / 255)
    img = img * (1 - alpha) + face.astype(np.float32) * alpha
    # occlusion: a random bar or blob over part of the face
    if r.random() < 0.35 * min(d, 2):
        color = r.uniform(0, 255, 3)
        x, y = r.uniform(0.2, 0.8, 2) * s
        w, h = r.uniform(0.12, 0.35, 2) * s
        occ = np.zeros((s, s), np.uint8)
        if r.random() < 0.5:
            cv2.rectangle(
                occ,
                _pt(x - w / 2, y - h / 2),
                _pt(x + w / 2, y + h / 2),
                255,
                -1,
                cv2.LINE_AA,
                _SHIFT,
            )
        else:
            cv2.ellipse(
                occ,
                _pt(x, y),
                _ax(w / 2, h / 2),
                r.uniform(0, 180),
                0,
                360,
                255,
                -1,
                cv2.LINE_AA,
                _SHIFT,
            )
        a = occ.astype(np.float32)[..., None] * (1 / 255)
        img = img * (1 - a) + color[None, None, :].astype(np.float32) * a
    # lighting: gain, a directional gradient, colour cast
    gain = math.exp(r.uniform(-0.35, 0.35) * d)
    angle = r.uniform(0, 2 * math.pi)
    g = np.linspace(-1, 1, s, dtype=np.float32)
    ramp = np.cos(angle) * g[None, :] + np.sin(angle) * g[:, None]
    light = gain * (1 + 0.3 * d * r.uniform(0, 1) * ramp)
    cast = np.exp(r.uniform(-0.15, 0.15, 3) * d).astype(np.float32)
    img = img * light[..., None] * cast[None, None, :]
    img = np.clip(img, 0, 255)
    if r.random() < 0.5 * min(d, 2):
        sigma = r.uniform(0.3, 1.3) * d * s / 112
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    if d > 0:
        img = img + r.normal(0, r.uniform(0, 8) * d, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def render_rgb(
    seed: int, identity: int, index: int, size: int = 112, difficulty: float = DEFAULT_DIFFICULTY
):
    """Image ``index`` of ``identity`` as RGB uint8 ``[size, size, 3]`` (for inspection)."""
    traits = identity_traits(seed, identity)
    bgr = render(traits, np.random.default_rng([seed, _IMAGE, identity, index]), size, difficulty)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _identity_jpegs(args: tuple[int, int, int, int, float, int]) -> list[bytes]:
    """JPEG bytes of images 0..n-1 of one identity (worker entry point)."""
    seed, identity, n, size, difficulty, quality = args
    traits = identity_traits(seed, identity)
    out = []
    for i in range(n):
        r = np.random.default_rng([seed, _IMAGE, identity, i])
        img = render(traits, r, size, difficulty)
        q = int(round(quality - r.uniform(0, 15) * min(difficulty, 2)))
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, max(q, 30)])
        if not ok:
            raise RuntimeError(f"JPEG encoding failed for identity {identity} image {i}")
        out.append(buf.tobytes())
    return out


# ---------------------------------------------------------------------------------------------
# Writing the data set


def _pool_map(fn, jobs: list, workers: int, progress=None):
    """Ordered map over ``jobs`` in ``workers`` processes, reporting progress per job."""
    if workers <= 1:
        for job in jobs:
            yield fn(job)
            if progress:
                progress(1)
        return
    # OpenCV's own threads would fight the worker processes for the cores.
    # forkserver: workers start from a clean process. A plain fork copies OpenCV's thread
    # pool in whatever state the parent left it, which deadlocked workers here.
    ctx = mp.get_context("forkserver" if os.name == "posix" else "spawn")
    with ctx.Pool(workers, initializer=cv2.setNumThreads, initargs=(1,)) as pool:
        for result in pool.imap(fn, jobs, chunksize=max(1, len(jobs) // (workers * 16))):
            yield result
            if progress:
                progress(1)


def make_pairs(
    seed: int, num_identities: int, images_per_identity: int, num_pairs: int
) -> list[tuple[bool, tuple[int, int], tuple[int, int]]]:
    """Verification pairs over held-out identities: half same, half different, interleaved.

    Returns:
        ``[(issame, (identity_a, image_a), (identity_b, image_b))]`` with identities counted
        from 0 within the held-out set; no pair repeats.
    """
    r = np.random.default_rng([seed, _PAIRS])
    half = num_pairs // 2
    same: set = set()
    diff: set = set()
    max_same = num_identities * images_per_identity * (images_per_identity - 1) // 2
    if half > max_same:
        raise ValueError(f"cannot draw {half} distinct same-identity pairs (at most {max_same})")
    while len(same) < half:
        ident = int(r.integers(num_identities))
        a, b = sorted(r.choice(images_per_identity, 2, replace=False).tolist())
        same.add(((ident, a), (ident, b)))
    while len(diff) < half:
        ia, ib = r.choice(num_identities, 2, replace=False).tolist()
        a, b = r.integers(images_per_identity, size=2).tolist()
        diff.add(((ia, a), (ib, b)))
    same_l, diff_l = sorted(same), sorted(diff)
    r.shuffle(same_l)
    r.shuffle(diff_l)
    pairs = []
    for s_pair, d_pair in zip(same_l, diff_l):
        pairs.append((True, *s_pair))
        pairs.append((False, *d_pair))
    return pairs


def make_synthetic(
    out_dir: str | os.PathLike, spec: SyntheticSpec, *, workers: int = 1, progress=None
) -> dict[str, Any]:
    """Writes the synthetic data set into ``out_dir``.

    Files: ``train.rec``/``train.idx`` (InsightFace layout: record 0 is a header with
    ``label = [num_images + 1, num_images + 1 + num_classes]``, keys ``1..num_images`` are the
    images with the identity as scalar label, then one record per identity with
    ``label = [first_key, last_key + 1]``), ``property`` (``num_classes,H,W``), ``val.bin``
    (pickle of (list of 2P JPEG byte strings, list of P bools)), ``val_pairs.csv`` (lines
    ``issame,path1,path2`` with paths relative to the CSV's directory), ``val_images/`` and
    ``synthetic.json`` (the spec).

    Args:
        out_dir: output directory (created).
        spec: what to generate.
        workers: processes used for drawing.
        progress: optional callable taking the number of identities just finished.

    Returns:
        Summary dict (counts and paths).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s = spec
    n_train = s.num_identities * s.images_per_identity
    jobs = [
        (s.seed, i, s.images_per_identity, s.image_size, s.difficulty, s.jpeg_quality)
        for i in range(s.num_identities)
    ]
    # held-out identities use indices after the training ones: same distribution, new people
    val_jobs = [
        (
            s.seed,
            s.num_identities + i,
            s.val_images_per_identity,
            s.image_size,
            s.difficulty,
            s.jpeg_quality,
        )
        for i in range(s.val_identities if s.val_pairs else 0)
    ]
    id_base = n_train + 1
    with RecordIOWriter(out / "train.rec", out / "train.idx") as w:
        w.write(pack(IRHeader(2, [id_base, id_base + s.num_identities], 0, 0), b""), key=0)
        key = 1
        ranges = []
        for ident, jpegs in enumerate(_pool_map(_identity_jpegs, jobs, workers, progress)):
            start = key
            for jpg in jpegs:
                w.write(pack(IRHeader(0, float(ident), key, 0), jpg), key=key)
                key += 1
            ranges.append((start, key))
        for ident, (start, stop) in enumerate(ranges):
            w.write(pack(IRHeader(2, [start, stop], id_base + ident, 0), b""), key=id_base + ident)
    (out / "property").write_text(f"{s.num_identities},{s.image_size},{s.image_size}\n")

    summary: dict[str, Any] = {
        "num_classes": s.num_identities,
        "num_images": n_train,
        "train_rec": str(out / "train.rec"),
    }
    if val_jobs:
        val_root = out / "val_images"
        val = list(_pool_map(_identity_jpegs, val_jobs, workers, progress))
        names = [f"v{i:05d}" for i in range(len(val))]
        for name, jpegs in zip(names, val):
            (val_root / name).mkdir(parents=True, exist_ok=True)
            for j, jpg in enumerate(jpegs):
                (val_root / name / f"{j:03d}.jpg").write_bytes(jpg)
        pairs = make_pairs(s.seed, len(val), s.val_images_per_identity, s.val_pairs)
        bins, issame = [], []
        with open(out / "val_pairs.csv", "w", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            for same, (ia, a), (ib, b) in pairs:
                bins += [val[ia][a], val[ib][b]]
                issame.append(bool(same))
                writer.writerow(
                    [
                        int(same),
                        f"val_images/{names[ia]}/{a:03d}.jpg",
                        f"val_images/{names[ib]}/{b:03d}.jpg",
                    ]
                )
        with open(out / "val.bin", "wb") as f:
            pickle.dump((bins, issame), f, protocol=4)
        summary.update(
            val_pairs=len(pairs), val_bin=str(out / "val.bin"), val_csv=str(out / "val_pairs.csv")
        )
    (out / "synthetic.json").write_text(json.dumps(asdict(s), indent=1) + "\n")
    return summary
