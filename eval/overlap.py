"""Identity overlap between a training set and verification targets.

Owns one job: finding the test images whose embedding falls as close to a training class
centre as images of that class do (``launch/rec.py overlap``). The class centres come from a
file (a training checkpoint's Partial FC classifier, read by
``dist_train.partial_fc.checkpoint_class_centers``; a saved ``export_class_centers`` matrix;
``launch/subcenter_clean.py``'s ``dominant_centers.pt``; a ``.npy`` array) or are computed from
the pack: the L2-normalised mean of each class's L2-normalised image embeddings. The threshold is
the rule of :func:`calibrate` unless one is given. The report lists, per target, the images
checked, the flagged ones with their nearest class and cosine, the identities (pair-list
folders) they belong to and the pairs that touch them.

Does not own reading packs (``dist_train.data``), reading targets (:mod:`eval.targets`),
loading models or embedding images (:mod:`eval.runner`, :mod:`eval.extract`), nor the
argument parsing (``launch/rec.py``).
"""

from __future__ import annotations

import json
import os
import sys
import types
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from dist_train.data.datasets import DataError, LabelledImages, open_train_dataset
from eval.extract import extract_embeddings
from eval.options import EvalOptions
from eval.targets import VerificationTarget, load_target

IMPOSTOR_QUANTILE = 0.999
"""The default threshold is this quantile of the training images' impostor cosines (to the
nearest centre of another class): a stranger's image exceeds it about once in 1,000."""

CALIBRATION_IMAGES = 10_000
"""Training images (a seeded random sample) whose cosines set the default threshold."""

PACK_CHUNK = 65_536
"""Pack images embedded per pass when computing centres: only a chunk's embeddings and the
``[C, D]`` sums are held, whatever the pack's size."""

_SIMS = 1 << 28  # cosines per matrix product in nearest_centers (1 GiB of fp32)


@dataclass
class TrainCenters:
    """The training classes a target is compared with.

    Attributes:
        centers: ``[C, K, D]`` float32, L2-normalised rows (K = 1 but for sub-centres).
        names: ``C`` class names (identity folders of the packed source, else the labels).
        source: ``"pack"`` (computed from the images) or the centres file.
    """

    centers: np.ndarray = field(repr=False)
    names: list[str]
    source: str

    @property
    def num_classes(self) -> int:
        return int(self.centers.shape[0])


@dataclass
class Calibration:
    """Where the threshold comes from: cosines of training images to the class centres.

    Attributes:
        impostor: ``[n]`` cosine of each sampled training image to the nearest centre of
            another class (what an image of a person absent from training scores).
        genuine: ``[n]`` cosine of each to its own class's centre.
        threshold: the cosine above which a test image is flagged.
        rule: the rule that set ``threshold``, in words.
    """

    impostor: np.ndarray = field(repr=False)
    genuine: np.ndarray = field(repr=False)
    threshold: float
    rule: str


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def progress_bar(total: int, desc: str, enabled: bool = True) -> tqdm:
    """Progress on stderr: redrawn live on a terminal, a status every 30 s in a log file."""
    redraw_s = 0.1 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, desc=desc, unit=" images", disable=not enabled, mininterval=redraw_s)


def embed(
    model: torch.nn.Module,
    load: Callable[[int, int], np.ndarray],
    num_images: int,
    options: EvalOptions,
    *,
    device: torch.device,
    bar: tqdm | None = None,
) -> np.ndarray:
    """``[N, D]`` L2-normalised embeddings through :func:`eval.extract.extract_embeddings`
    (batched, flip TTA as ``options`` say); ``bar`` advances as batches are loaded."""

    def counted(start: int, stop: int) -> np.ndarray:
        images = load(start, stop)
        if bar is not None:
            bar.update(stop - start)
        return images

    out = extract_embeddings(model, counted, num_images, options, device=device)
    return _normalise(out.embeddings)


# --------------------------------------------------------------------------------------------
# The training side
# --------------------------------------------------------------------------------------------


def open_pack(pack: str, options: EvalOptions) -> LabelledImages:
    """The training images (``train.rec`` pack, its folder, an image folder or a list),
    prepared by ``options``' evaluation transform.

    Raises:
        DataError: the pack does not exist (names it).
    """
    if not os.path.exists(pack):
        raise DataError(f"{pack}: training pack does not exist")
    return open_train_dataset(types.SimpleNamespace(root=pack, format="auto"), options.transform())


def class_names(data: LabelledImages, pack: str) -> list[str]:
    """Class names: the folder names (``classes.txt`` that ``rec.py pack`` writes beside
    ``train.rec``, or an image folder's sub-folders), else the raw labels."""
    names = getattr(data, "class_names", None)
    if names is not None:
        return [str(n) for n in names]
    root = Path(pack)
    listing = (root if root.is_dir() else root.parent) / "classes.txt"
    raw = [int(c) for c in np.asarray(data.classes).tolist()]
    if listing.is_file():
        written = listing.read_text(encoding="utf-8").splitlines()
        if all(0 <= c < len(written) for c in raw):
            return [written[c] for c in raw]
    return [str(c) for c in raw]


def _load_pack(data: LabelledImages, rows: np.ndarray) -> Callable[[int, int], np.ndarray]:
    def load(start: int, stop: int) -> np.ndarray:
        return np.stack([data[int(i)][0] for i in rows[start:stop]]).transpose(0, 3, 1, 2)

    return load


def pack_centers(
    model: torch.nn.Module,
    data: LabelledImages,
    pack: str,
    options: EvalOptions,
    sample: np.ndarray,
    *,
    device: torch.device,
    progress: bool = True,
) -> tuple[TrainCenters, np.ndarray]:
    """Class centres computed from every image of the pack, :data:`PACK_CHUNK` images a pass.

    Args:
        sample: sorted indices of the images whose embeddings are also returned.

    Returns:
        ``(centres, [len(sample), D] normalised embeddings of the sample)``; centre c is the
        L2-normalised mean of class c's normalised embeddings.
    """
    labels = torch.as_tensor(np.asarray(data.labels, dtype=np.int64))
    sums: torch.Tensor | None = None
    kept = []
    with progress_bar(len(data), "pack", progress) as bar:
        for a in range(0, len(data), PACK_CHUNK):
            rows = np.arange(a, min(a + PACK_CHUNK, len(data)))
            emb = embed(model, _load_pack(data, rows), len(rows), options, device=device, bar=bar)
            if sums is None:
                sums = torch.zeros(data.num_classes, emb.shape[1], dtype=torch.float64)
            sums.index_add_(0, labels[a : a + len(rows)], torch.from_numpy(emb).double())
            kept.append(emb[sample[(sample >= a) & (sample < a + len(rows))] - a])
    centers = _normalise(sums.numpy())[:, None, :]
    return TrainCenters(centers, class_names(data, pack), "pack"), np.concatenate(kept)


def read_centers(path: str) -> np.ndarray:
    """The ``[C, D]`` or ``[C, K, D]`` class centres in ``path`` as ``[C, K, D]`` float32
    (not normalised).

    Accepted: a training checkpoint (its Partial FC classifier, every loss shard file), a
    ``torch.save``'d tensor (``export_class_centers``) or dict with ``centers``
    (``dominant_centers.pt``), or a ``.npy`` array.

    Raises:
        DataError: the file is missing, unreadable or holds no centre matrix (names it).
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: class centres file does not exist")
    if path.endswith(".npy"):
        try:
            value: Any = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read class centres ({exc})") from exc
    else:
        try:
            value = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a training checkpoint holds RNG states: read below
            value = None
        if value is None or (isinstance(value, dict) and "loss_shards" in value):
            from dist_train.partial_fc import checkpoint_class_centers

            try:
                value, _ = checkpoint_class_centers(path)
            except (OSError, RuntimeError, ValueError, KeyError) as exc:
                raise DataError(f"{path}: no class centres readable ({exc})") from exc
        elif isinstance(value, dict):
            if "centers" not in value:
                raise DataError(
                    f"{path}: a dict without key 'centers' and not a training checkpoint"
                )
            value = value["centers"]
    arr = value.float().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.ndim not in (2, 3) or not np.issubdtype(arr.dtype, np.floating):
        raise DataError(
            f"{path}: class centres must be a float [C, D] or [C, K, D] matrix, got "
            f"{arr.dtype} {list(arr.shape)}"
        )
    return (arr[:, None, :] if arr.ndim == 2 else arr).astype(np.float32)


def file_centers(path: str, data: LabelledImages, pack: str) -> TrainCenters:
    """:func:`read_centers` checked against the pack's classes, normalised."""
    centers = read_centers(path)
    if centers.shape[0] != data.num_classes:
        raise DataError(
            f"{path}: {centers.shape[0]} class centres, the training pack {pack} has "
            f"{data.num_classes} classes"
        )
    return TrainCenters(_normalise(centers), class_names(data, pack), path)


def nearest_centers(
    embeddings: np.ndarray,
    centers: np.ndarray,
    exclude: np.ndarray | None = None,
    *,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest class of each embedding by cosine (the best of a class's sub-centres).

    Args:
        embeddings: ``[N, D]`` normalised.
        centers: ``[C, K, D]`` normalised.
        exclude: ``[N]`` a class to leave out for each row (its own), or None.
        device: where the products run (``[chunk, C·K]`` at a time).

    Returns:
        ``([N] int64 class, [N] float32 cosine)``.
    """
    dev = torch.device(device)
    c, k, d = centers.shape
    table = torch.from_numpy(np.ascontiguousarray(centers.reshape(c * k, d))).to(dev)
    classes, cosines = [], []
    step = max(1, min(4096, _SIMS // (c * k)))
    for a in range(0, len(embeddings), step):
        q = torch.from_numpy(np.ascontiguousarray(embeddings[a : a + step])).to(dev)
        sims = (q @ table.T).view(-1, c, k).amax(dim=2)
        if exclude is not None:
            own = torch.from_numpy(np.asarray(exclude[a : a + step], dtype=np.int64)).to(dev)
            sims.scatter_(1, own[:, None], float("-inf"))
        best, index = sims.max(dim=1)
        classes.append(index.cpu().numpy())  # device sync, once per chunk
        cosines.append(best.float().cpu().numpy())
    if not classes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(classes).astype(np.int64), np.concatenate(cosines)


def calibrate(
    embeddings: np.ndarray,
    labels: np.ndarray,
    centers: TrainCenters,
    threshold: float | None = None,
    *,
    device: torch.device | str = "cpu",
) -> Calibration:
    """The flagging threshold from training images whose classes are known.

    The rule: a test image is flagged when its cosine to the nearest training centre exceeds
    the ``IMPOSTOR_QUANTILE`` (99.9 %) quantile of the impostor cosines of training images, the
    cosine of each to the nearest centre of a class other than its own. That is the score an
    image of someone absent from the training set gets (the nearest of C identities that are
    not the person), so strangers pass it about once in 1,000 images, while an image of a
    training identity scores like the genuine cosines (to its own centre), far above. The
    threshold follows the model and the number of classes (more classes, higher nearest
    impostor); an explicit ``threshold`` replaces the rule.

    Args:
        embeddings: ``[n, D]`` normalised embeddings of training images.
        labels: ``[n]`` their classes.
        centers: the training centres.
        threshold: a fixed cosine instead of the rule.
        device: where the products run.
    """
    if len(embeddings) and centers.num_classes > 1:
        _, impostor = nearest_centers(embeddings, centers.centers, labels, device=device)
    else:
        impostor = np.zeros(0, dtype=np.float32)
    own = np.einsum("nd,nkd->nk", embeddings, centers.centers[labels]).max(axis=1)
    if threshold is not None:
        return Calibration(impostor, own, float(threshold), f"fixed cosine {threshold:g}")
    if impostor.size == 0:
        raise ValueError(
            "the threshold rule needs training images of at least two classes; give --threshold"
        )
    value = float(np.quantile(impostor.astype(np.float64), IMPOSTOR_QUANTILE))
    rule = (
        f"{IMPOSTOR_QUANTILE:.1%} quantile of {impostor.size} training images' cosines to the "
        "nearest centre of another class"
    )
    return Calibration(impostor, own, value, rule)


# --------------------------------------------------------------------------------------------
# The test side
# --------------------------------------------------------------------------------------------


def _image_names(target: VerificationTarget) -> list[str]:
    """A name per image: the path as the pair list writes it, else ``image i`` of the .bin."""
    names = [f"image {i}" for i in range(target.num_images)]
    if target.pair_names is not None:
        for (a, b), (na, nb) in zip(target.pairs.tolist(), target.pair_names):
            names[a], names[b] = na, nb
    return names


def check_target(
    target: VerificationTarget,
    embeddings: np.ndarray,
    centers: TrainCenters,
    threshold: float,
    *,
    device: torch.device | str = "cpu",
) -> dict[str, Any]:
    """The overlap report of one target from its images' normalised ``[N, D]`` embeddings.

    Returns:
        ``images`` (checked), ``flagged_images`` and ``flagged`` (each: ``image``,
        ``nearest_class``, ``class_name``, ``cosine``; highest cosine first), ``max_cosine``,
        ``pairs`` and ``pairs_touching_flagged`` with ``flagged_pairs`` (index, the two
        images, the label); for pair lists also ``identities`` (image folders) and
        ``flagged_identities`` (each: ``identity``, ``images``, ``flagged``,
        ``nearest_classes``).
    """
    nearest, cosine = nearest_centers(embeddings, centers.centers, device=device)
    hit = cosine > threshold
    names = _image_names(target)
    order = np.argsort(-cosine[hit], kind="stable")
    flagged = [
        {
            "image": names[i],
            "nearest_class": int(nearest[i]),
            "class_name": centers.names[int(nearest[i])],
            "cosine": float(cosine[i]),
        }
        for i in np.flatnonzero(hit)[order].tolist()
    ]
    touching = np.flatnonzero(hit[target.pairs].any(axis=1))
    pairs = []
    for p in touching.tolist():
        a, b = target.pairs[p].tolist()
        entry: dict[str, Any] = {"pair": p, "images": [names[a], names[b]]}
        if target.issame is not None:
            entry["same"] = bool(target.issame[p])
        pairs.append(entry)
    out: dict[str, Any] = {
        "path": target.path,
        "images": target.num_images,
        "flagged_images": int(hit.sum()),
        "max_cosine": float(cosine.max()) if cosine.size else None,
        "pairs": target.num_pairs,
        "pairs_touching_flagged": len(pairs),
        "flagged": flagged,
        "flagged_pairs": pairs,
    }
    if target.pair_names is not None:
        folder = [os.path.dirname(n) for n in names]
        per_identity: dict[str, list[int]] = {}
        for i, f in enumerate(folder):
            per_identity.setdefault(f, []).append(i)
        out["identities"] = len(per_identity)
        out["flagged_identities"] = [
            {
                "identity": f,
                "images": len(rows),
                "flagged": int(hit[rows].sum()),
                "nearest_classes": [
                    centers.names[c] for c, _ in Counter(nearest[rows][hit[rows]]).most_common()
                ],
            }
            for f, rows in per_identity.items()
            if hit[rows].any()
        ]
    return out


def summary_line(name: str, entry: dict[str, Any], threshold: float) -> str:
    """One line per target: what was flagged."""
    text = f"{name}: {entry['flagged_images']} of {entry['images']} images flagged"
    if "identities" in entry:
        text += f" ({len(entry['flagged_identities'])} of {entry['identities']} identities)"
    text += (
        f", {entry['pairs_touching_flagged']} of {entry['pairs']} pairs touch them; cosine to "
        f"the nearest training class > {threshold:.3f}"
    )
    if entry["flagged"]:
        top = entry["flagged"][0]
        text += f"; highest {top['cosine']:.3f} ({top['image']} ~ class {top['class_name']})"
    elif entry["max_cosine"] is not None:
        text += f"; highest {entry['max_cosine']:.3f}"
    return text


def find_overlap(
    model: torch.nn.Module,
    pack: str,
    targets: Sequence[str],
    options: EvalOptions,
    *,
    centers_file: str | None = None,
    threshold: float | None = None,
    images_root: str | None = None,
    calibration_images: int = CALIBRATION_IMAGES,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Checks every target against the training pack's classes.

    Args:
        model: the backbone (eval mode; ``eval.runner.load_model``).
        pack: the training set (``rec.py pack`` output folder or ``train.rec``; an image
            folder or list works too).
        targets: ``.bin`` sets and pair lists.
        options: how images are prepared and embedded (both sides alike).
        centers_file: class centres to use instead of computing them from the pack
            (:func:`read_centers`); then only the calibration sample of the pack is embedded.
        threshold: a fixed cosine instead of :func:`calibrate`'s rule.
        images_root: root of the pair lists' image paths (default: each list's directory).
        calibration_images: training images sampled for the rule (seeded; all when fewer).
        device: where the forward passes and products run.
        progress: progress bars on stderr.

    Returns:
        The report: ``train``, ``centers``, ``num_classes``, ``threshold``, ``rule``,
        ``calibration`` (impostor and genuine quantiles) and ``targets`` (name ->
        :func:`check_target`'s entry).
    """
    device = torch.device(device)
    data = open_pack(pack, options)
    # every target is read before any embedding, so a bad path fails at once, naming itself
    loaded = [load_target(t, images_root) for t in targets]
    centers = None if centers_file is None else file_centers(centers_file, data, pack)
    labels = np.asarray(data.labels, dtype=np.int64)
    rows = np.arange(len(data))
    if len(rows) > calibration_images:
        rows = np.sort(np.random.default_rng(0).choice(rows, calibration_images, replace=False))
    if centers is None:
        centers, emb = pack_centers(
            model, data, pack, options, rows, device=device, progress=progress
        )
    else:
        with progress_bar(len(rows), "pack sample", progress) as bar:
            emb = embed(model, _load_pack(data, rows), len(rows), options, device=device, bar=bar)
        if centers.centers.shape[2] != emb.shape[1]:
            raise DataError(
                f"{centers_file}: centres of size {centers.centers.shape[2]}, the model embeds "
                f"{emb.shape[1]}"
            )
    cal = calibrate(emb, labels[rows], centers, threshold, device=device)
    quantiles = (0.01, 0.05, 0.5, 0.95, 0.99, 0.999)

    def q(x: np.ndarray) -> dict[str, float]:
        return {f"{p:g}": float(np.quantile(x, p)) for p in quantiles} if x.size else {}

    report: dict[str, Any] = {
        "train": pack,
        "centers": centers.source,
        "num_classes": centers.num_classes,
        "sub_centers": int(centers.centers.shape[1]),
        "threshold": cal.threshold,
        "rule": cal.rule,
        "calibration": {
            "images": int(len(rows)),
            "impostor_quantiles": q(cal.impostor),
            "genuine_quantiles": q(cal.genuine),
        },
        "targets": {},
    }
    for target in loaded:
        with progress_bar(target.num_images, target.name, progress) as bar:
            temb = embed(
                model, lambda a, b, t=target: t.load_images(a, b, options.transform()),
                target.num_images, options, device=device, bar=bar,
            )  # fmt: skip
        name = target.name
        while name in report["targets"]:
            name += "_"
        report["targets"][name] = check_target(target, temb, centers, cal.threshold, device=device)
    return report


def run(
    weights: str,
    pack: str,
    targets: Sequence[str],
    *,
    network: str | None = None,
    embedding_size: int | None = None,
    batch_size: int = 128,
    flip: bool = True,
    device: str = "cpu",
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`find_overlap` with the model of ``weights`` (``eval.runner.load_model``) and the
    input preparation it was trained with (its config's ``data`` section, else the defaults).

    ``kwargs``: the remaining keywords of :func:`find_overlap`.
    """
    from eval.runner import input_from, load_model, normalisation_from

    model, config = load_model(weights, network, embedding_size)
    options = EvalOptions(
        batch_size=batch_size, flip=flip, **normalisation_from(config), **input_from(config)
    )
    dev = torch.device(device)
    return find_overlap(model.to(dev), pack, targets, options, device=dev, **kwargs)


def write_report(path: str, report: dict[str, Any]) -> None:
    """Writes the report as JSON (its folder is created)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, allow_nan=False)
        f.write("\n")
