"""Evaluation runs: load a model, embed each target, compute its metrics.

Owns the glue used by ``launch/eval.py`` and by the trainer's evaluation hook:
:func:`load_backbone` (training checkpoint, plain state dict, ``.safetensors`` or ``.onnx``),
:func:`evaluate_targets` (the flat ``target -> metric -> value`` dict the trainer logs),
:func:`evaluate_targets_full` (also the curves, scores and fold thresholds that reports,
plots and TensorBoard need), and for IJB folders :func:`extract_ijb_features` (loose crops
aligned by their landmarks, both views through the same extraction) and
:func:`score_ijb` (the scores of :mod:`eval.ijb` as a :class:`TargetResult`). It never trains
and never writes files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from dist_train.data.align import align_face
from dist_train.data.datasets import DataError, decode_image
from eval import ijb, metrics
from eval.extract import extract_embeddings
from eval.options import EvalOptions
from eval.targets import TargetError, VerificationTarget, load_target

# --------------------------------------------------------------------------------------------
# Loading models
# --------------------------------------------------------------------------------------------


class ModelLoadError(ValueError):
    """A weights file that cannot be turned into a backbone; the message names the file."""


class OnnxBackbone(nn.Module):
    """An ONNX image -> embedding model run by onnxruntime behind the backbone interface.

    ``forward`` takes a float tensor ``[B, 3, H, W]`` (already normalised) and returns
    ``[B, D]`` float32 on the input's device. A model exported with a fixed batch size is fed
    in chunks of that size.
    """

    def __init__(self, path: str) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:  # optional dependency (the "export" extra)
            raise ModelLoadError(
                f"{path}: onnxruntime is needed for ONNX models (pip install onnxruntime)"
            ) from exc
        try:
            available = ort.get_available_providers()
            providers = [
                p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available
            ]
            self.session = ort.InferenceSession(path, providers=providers or available)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise ModelLoadError(f"{path}: onnxruntime cannot load the model ({exc})") from exc
        inp = self.session.get_inputs()[0]
        self.input_name = inp.name
        first = inp.shape[0] if inp.shape else None
        self.fixed_batch = first if isinstance(first, int) and first > 0 else None
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().float().cpu().numpy()
        step = self.fixed_batch or max(arr.shape[0], 1)
        outs = []
        for i in range(0, arr.shape[0], step):
            chunk = arr[i : i + step]
            pad = step - chunk.shape[0] if self.fixed_batch else 0
            if pad:
                chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
            out = self.session.run(None, {self.input_name: chunk})[0]
            outs.append(out[: out.shape[0] - pad])
        return torch.from_numpy(np.concatenate(outs).astype(np.float32)).to(x.device)


def read_weights(path: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Backbone state dict and training config of a weights file, read by
    :func:`backbones.weights.read_weights_file` (the project's one weights reader).

    Raises:
        ModelLoadError: the file is missing or holds no backbone state dict (names the file).
    """
    from backbones.weights import read_weights_file

    try:
        return read_weights_file(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(str(exc)) from exc


def load_model(
    weights: str,
    network: str | None = None,
    embedding_size: int | None = None,
    **backbone_kwargs: Any,
) -> tuple[nn.Module, dict | None]:
    """Like :func:`load_backbone`, also returning the checkpoint's config (or None).

    The file is read once; the config tells the caller the training normalisation
    (:func:`normalisation_from`).
    """
    if weights.endswith(".onnx"):
        if not os.path.isfile(weights):
            raise ModelLoadError(f"{weights}: ONNX model does not exist")
        return OnnxBackbone(weights).eval(), None
    import backbones

    state, config = read_weights(weights)
    bcfg = (config or {}).get("backbone") or {}
    name = network or bcfg.get("name")
    if not name:
        raise ModelLoadError(f"{weights}: no --network given and no backbone name in the file")
    size = embedding_size or bcfg.get("embedding_size") or 512
    kwargs = dict(bcfg.get("params") or {}) if name == bcfg.get("name") else {}
    kwargs.update(backbone_kwargs)
    model = backbones.get_backbone(name, embedding_size=int(size), **kwargs)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches raise even with strict=False
        detail = " ".join(str(exc).split())
        raise ModelLoadError(
            f"{weights}: weights do not fit backbone {name!r} (D={size}): {detail}"
        ) from exc
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights}: weights do not fit backbone {name!r} (D={size}): "
            f"{len(missing)} missing keys {list(missing)[:3]}, "
            f"{len(unexpected)} unexpected keys {list(unexpected)[:3]}"
        )
    return model.eval(), config


def load_backbone(
    weights: str,
    network: str | None = None,
    embedding_size: int | None = None,
    **backbone_kwargs: Any,
) -> nn.Module:
    """A backbone with weights loaded, ready for :func:`evaluate_targets`.

    Args:
        weights: ``.onnx`` model, ``.safetensors`` state dict, plain state dict or training
            checkpoint (``{"backbone": ..., "config": ...}``).
        network: registered backbone name; may be omitted for ONNX models and for checkpoints
            whose config names it.
        embedding_size: D; by default the checkpoint's config value, else 512.
        backbone_kwargs: extra builder arguments (override the checkpoint's ``params``).

    Returns:
        The module in eval mode on the CPU (move it with ``.to(device)``).
    """
    return load_model(weights, network, embedding_size, **backbone_kwargs)[0]


def normalisation_from(config: dict | None) -> dict[str, float]:
    """``{"mean", "std"}`` from a training config's ``data`` section (empty when absent)."""
    data = (config or {}).get("data") or {}
    return {k: float(data[k]) for k in ("mean", "std") if k in data}


def input_from(config: dict | None) -> dict[str, int]:
    """``{"image_size", "center_crop"}`` from a training config's ``data`` section (the input
    the network was trained on; empty when absent)."""
    data = (config or {}).get("data") or {}
    return {k: int(data[k]) for k in ("image_size", "center_crop") if k in data}


# --------------------------------------------------------------------------------------------
# Evaluating targets
# --------------------------------------------------------------------------------------------


@dataclass
class TargetResult:
    """Everything measured on one target.

    Attributes:
        name: target name.
        metrics: flat ``metric -> value`` (empty for an unlabelled list but for counts).
        scores: ``[P]`` cosine similarity of each pair.
        issame: ``[P]`` labels or None.
        kfold: the k-fold protocol's details (labelled targets).
        tar_at_far: TAR@FAR points with their impostor counts (labelled targets).
        best_f1: the best-F1 operating point (labelled targets).
        target: the evaluated target (pair names, paths).
        embeddings: ``[N, D]`` raw embeddings of the target's images.
        details: further JSON-ready figures for the report (IJB: per-gallery 1:N, switches).
    """

    name: str
    metrics: dict[str, float]
    scores: np.ndarray = field(repr=False)
    issame: np.ndarray | None = field(default=None, repr=False)
    kfold: metrics.KFoldResult | None = field(default=None, repr=False)
    tar_at_far: list[metrics.TarAtFar] = field(default_factory=list, repr=False)
    best_f1: metrics.BestF1 | None = field(default=None, repr=False)
    target: VerificationTarget | None = field(default=None, repr=False)
    embeddings: np.ndarray | None = field(default=None, repr=False)
    details: dict[str, Any] = field(default_factory=dict, repr=False)

    def curves(self) -> dict[str, np.ndarray]:
        """ROC (``fpr``, ``tpr``) and precision–recall arrays for plots (labelled only)."""
        if self.issame is None:
            return {}
        fpr, tpr, _ = metrics.roc_curve(self.scores, self.issame)
        precision, recall, _ = metrics.precision_recall_curve(self.scores, self.issame)
        return {"fpr": fpr, "tpr": tpr, "precision": precision, "recall": recall}


def score_target(
    target: VerificationTarget,
    embeddings: np.ndarray,
    norms: np.ndarray | None = None,
    n_folds: int = 10,
    fars: Sequence[float] = metrics.DEFAULT_FARS,
) -> TargetResult:
    """Metrics of one target from its image embeddings (pure numpy, no model).

    Args:
        target: the pairs and labels.
        embeddings: ``[N, D]`` one row per image of ``target``.
        norms: ``[N, V]`` single-view embedding norms (default: the norms of the rows of
            ``embeddings``). XNorm averages them over the ``2P`` pair sides, as InsightFace
            does over the images of a ``.bin`` file, whatever the images' sharing.
        n_folds: folds of the accuracy protocol.
        fars: FARs for TAR@FAR.
    """
    emb1 = embeddings[target.pairs[:, 0]]
    emb2 = embeddings[target.pairs[:, 1]]
    distances, scores = metrics.distances_and_scores(emb1, emb2)
    if norms is None:
        norms = np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)[:, None]
    uses = np.bincount(target.pairs.ravel(), minlength=target.num_images)
    xn = float(np.sum(uses[:, None] * norms) / (uses.sum() * norms.shape[1]))
    out: dict[str, float] = {"num_pairs": float(target.num_pairs), "xnorm": xn}
    result = TargetResult(target.name, out, scores, target.issame, target=target)
    result.embeddings = embeddings
    if target.issame is None:
        return result
    issame = target.issame
    if issame.all() or not issame.any():
        raise ValueError(f"{target.path}: needs both same and different pairs for metrics")
    folds = min(n_folds, target.num_pairs)
    kf = metrics.kfold_from_distances(distances, issame, n_folds=folds)
    rate, rate_thr = metrics.eer(scores, issame)
    tars = metrics.tar_at_far(scores, issame, tuple(fars))
    f1 = metrics.best_f1(scores, issame)
    out.update(
        {
            "accuracy": kf.accuracy,
            "accuracy_std": kf.accuracy_std,
            "threshold": float(np.mean(kf.fold_thresholds)),
            "eer": rate,
            "eer_threshold": rate_thr,
            "auc": metrics.roc_auc(scores, issame),
            "best_f1": f1.f1,
            "best_f1_threshold": f1.threshold,
            "precision": f1.precision,
            "recall": f1.recall,
        }
    )
    for t in tars:
        out[f"tar@far={metrics.far_label(t.far)}"] = t.tar
    result.kfold, result.tar_at_far, result.best_f1 = kf, tars, f1
    return result


def load_eval_target(spec: str, images_root: str | None = None):
    """A target named in ``eval.targets``: an IJB folder (``DIR`` holding ``meta/``, or
    ``IJBB:DIR`` / ``IJBC:DIR``) as :class:`eval.ijb.IJBMeta`, anything else through
    :func:`eval.targets.load_target`."""
    if ijb.is_ijb_spec(spec):
        return ijb.read_meta_spec(spec)
    return load_target(spec, images_root)


def _as_target(t: str | VerificationTarget | ijb.IJBMeta) -> VerificationTarget | ijb.IJBMeta:
    return t if isinstance(t, VerificationTarget | ijb.IJBMeta) else load_eval_target(t)


def evaluate_targets_full(
    backbone: nn.Module,
    targets: Sequence[str | VerificationTarget],
    options: EvalOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> dict[str, TargetResult]:
    """Embeds and scores every target; see :func:`evaluate_targets` for the arguments.

    Images are embedded once however many targets use them (matched by a digest of their
    encoded bytes). Under a process group every rank must call this; each embeds a contiguous
    shard of the images and every rank returns the same results. An IJB folder (a path to it
    or an :class:`eval.ijb.IJBMeta`) is extracted by :func:`extract_ijb_features` and scored by
    :func:`score_ijb` with InsightFace's default switches (flip as ``options.flip``); every
    rank scores it.

    Returns:
        ``target name -> TargetResult`` in the order given (a repeated name gets a suffix).
    """
    options = EvalOptions.with_overrides(options, **overrides)
    transform = options.transform()
    device = torch.device(device)
    loaded = [_as_target(t) for t in targets]
    verification = [t for t in loaded if isinstance(t, VerificationTarget)]
    # Images shared by several targets (a .bin and the pair list of the same pairs, say) are
    # embedded once: every target's images map to rows of one union, found by content digest.
    union: dict[bytes, int] = {}
    where: list[tuple[VerificationTarget, int]] = []
    rows_of: list[np.ndarray] = []
    for target in verification:
        rows = []
        for i, key in enumerate(target.content_keys()):
            if key not in union:
                union[key] = len(where)
                where.append((target, i))
            rows.append(union[key])
        rows_of.append(np.asarray(rows, dtype=np.int64))

    def load(start: int, stop: int) -> np.ndarray:
        images = [t.load_images(i, i + 1, transform) for t, i in where[start:stop]]
        shapes = {im.shape[1:] for im in images}
        if len(shapes) > 1:
            names = sorted({t.path for t, _ in where[start:stop]})
            raise TargetError(
                f"images of {', '.join(names)} have different sizes {sorted(shapes)}; "
                "pass image_size (--image-size) to resize them"
            )
        return np.concatenate(images)

    if verification:
        emb = extract_embeddings(backbone, load, len(where), options, device=device)
    rows_iter = iter(rows_of)
    results: dict[str, TargetResult] = {}
    for target in loaded:
        if isinstance(target, ijb.IJBMeta):
            raw = extract_ijb_features(backbone, target, options, device=device)
            result = score_ijb(target, raw, ijb.IJBSwitches(flip=options.flip))
        else:
            rows = next(rows_iter)
            result = score_target(
                target, emb.embeddings[rows], emb.norms[rows], n_folds=options.n_folds
            )
        name = result.name
        while name in results:
            name += "_"
        result.name = name
        results[name] = result
    return results


def evaluate_targets(
    backbone: nn.Module,
    targets: Sequence[str | VerificationTarget],
    options: EvalOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    **overrides: Any,
) -> dict[str, dict[str, float]]:
    """Verification metrics of ``backbone`` on each target.

    Args:
        backbone: image -> embedding module (DDP wrappers are unwrapped; its train/eval mode
            is restored afterwards).
        targets: ``.bin`` / pair-list paths or already loaded :class:`VerificationTarget`.
        options: batch, flip, low light, normalisation, autocast, input size and folds
            (default: :class:`EvalOptions`'s defaults).
        device: where the forward passes run.
        overrides: fields of :class:`EvalOptions` replacing those of ``options``
            (``evaluate_targets(model, paths, batch_size=32)``).

    :func:`evaluate_targets_full` does the work; this returns only the metrics.

    Returns:
        ``target name -> metric -> value`` with keys ``accuracy``, ``accuracy_std``,
        ``threshold``, ``eer``, ``eer_threshold``, ``auc``, ``tar@far=1e-1`` … ``1e-4`` (NaN
        when the target has fewer than ``1/FAR`` impostor pairs), ``best_f1``,
        ``best_f1_threshold``, ``precision``, ``recall``, ``xnorm``, ``num_pairs``. Unlabelled
        lists only have ``xnorm`` and ``num_pairs``.
    """
    full = evaluate_targets_full(backbone, targets, options, device=device, **overrides)
    return {name: r.metrics for name, r in full.items()}


# --------------------------------------------------------------------------------------------
# IJB folders
# --------------------------------------------------------------------------------------------


def ijb_crop(meta: ijb.IJBMeta, i: int, transform: Any = None) -> np.ndarray:
    """Image ``i`` of an IJB target: decoded (the training decoder), aligned by its five
    landmarks onto the ArcFace 112x112 template (``dist_train.data.align.align_face``), then
    prepared by the evaluation transform; ``[H, W, 3]`` uint8 RGB.

    Raises:
        TargetError: the file is missing or not an image (names it).
    """
    path = meta.image_path(i)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise TargetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        img = decode_image(data, where=path)
    except DataError as exc:
        raise TargetError(str(exc)) from None
    img = align_face(img, meta.landmarks[i])
    return transform(img) if transform is not None else img


def extract_ijb_features(
    backbone: nn.Module,
    meta: ijb.IJBMeta,
    options: EvalOptions | None = None,
    *,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Raw ``[N, 2D]`` float32 features of an IJB target: each aligned crop, then its mirror.

    The crop and its mirror are two rows of one extraction (:func:`eval.extract.
    extract_embeddings`, flip TTA off: the mirror is a row of its own), so both views keep
    their own feature and the flip convention is applied at scoring time
    (:func:`eval.ijb.image_features`). Under a process group every rank must call this;
    each embeds a contiguous shard and all return the full array.
    """
    options = EvalOptions.with_overrides(options, flip=False)
    transform = options.transform()
    n = meta.num_images

    def load(start: int, stop: int) -> np.ndarray:
        crops: dict[int, np.ndarray] = {}
        views = []
        for row in range(start, stop):
            i, mirrored = divmod(row, 2)
            if i not in crops:
                crops[i] = ijb_crop(meta, i, transform)
            view = crops[i][:, ::-1] if mirrored else crops[i]
            views.append(view.transpose(2, 0, 1))
        return np.ascontiguousarray(np.stack(views))

    emb = extract_embeddings(
        backbone, load, 2 * n, options, device=torch.device(device), progress=meta.target
    )
    return emb.embeddings.reshape(n, -1).astype(np.float32, copy=False)


def score_ijb(
    meta: ijb.IJBMeta, raw: np.ndarray, switches: ijb.IJBSwitches | None = None
) -> TargetResult:
    """:func:`eval.ijb.evaluate` as a :class:`TargetResult` named after the target (pair
    scores and labels for the plots, per-gallery 1:N figures and the switches in ``details``)."""
    switches = switches or ijb.IJBSwitches()
    res = ijb.evaluate(meta, raw, switches)
    result = TargetResult(meta.target, res.metrics, res.scores, res.labels)
    result.details = {
        "ijb": {
            "root": meta.root,
            "flip": switches.flip,
            "norm_score": switches.norm_score,
            "detector_score": switches.detector_score,
            "galleries": res.details(),
        }
    }
    return result
