"""The offline step of Sub-center ArcFace: dominant sub-centres and the images off them.

Owns :func:`clean_sub_centers` (Deng et al. 2020, "drop non-dominant sub-centers"): for
every class, the sub-centre nearest to most of the class's images is its *dominant* one; the
class keeps that centre only (the ``[C, D]`` matrix a plain ArcFace can start from), and the
images whose nearest sub-centre of their class is not the dominant one are the likely label
noise that the cleaning lists. Also reads the ``[C, K, D]`` sub-centres out of a training
checkpoint (:func:`checkpoint_sub_centers`). Does not own embedding the images (the caller,
``launch/subcenter_clean.py``) nor the training-time head (``heads.margins_magnitude``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from dist_train.partial_fc.state import checkpoint_class_centers


@dataclasses.dataclass
class SubCenterCleaning:
    """Result of :func:`clean_sub_centers` (C classes, K sub-centres, N images).

    Attributes:
        dominant: ``[C]`` int64, the dominant sub-centre of each class (0 for a class without
            images).
        centers: ``[C, D]`` the dominant centre of each class (un-normalised, as trained).
        counts: ``[C, K]`` int64, images nearest to each sub-centre of their class.
        nearest: ``[N]`` int64, each image's nearest sub-centre of its own class.
        angle_to_dominant: ``[N]`` degrees between each image and its class's dominant centre.
        outliers: ``[M]`` int64 sorted indices of the images whose nearest sub-centre is not
            the dominant one.
    """

    dominant: torch.Tensor
    centers: torch.Tensor
    counts: torch.Tensor
    nearest: torch.Tensor
    angle_to_dominant: torch.Tensor
    outliers: torch.Tensor


def clean_sub_centers(
    centers: torch.Tensor, embeddings: torch.Tensor, labels: torch.Tensor
) -> SubCenterCleaning:
    """Dominant sub-centre per class and the images nearest to a non-dominant one.

    Args:
        centers: ``[C, K, D]`` sub-centres (any scale: cosines are used).
        embeddings: ``[N, D]`` embeddings of the training images (any scale).
        labels: ``[N]`` int class ids in ``[0, C)``.

    Raises:
        ValueError: shapes disagree, naming them, or a label is outside ``[0, C)``.
    """
    if centers.dim() != 3 or embeddings.dim() != 2 or centers.shape[2] != embeddings.shape[1]:
        raise ValueError(
            f"clean_sub_centers: need centers [C, K, D] and embeddings [N, D], got "
            f"{tuple(centers.shape)} and {tuple(embeddings.shape)}"
        )
    c, k, _ = centers.shape
    labels = labels.to(torch.long)
    if labels.shape != embeddings.shape[:1]:
        raise ValueError(f"clean_sub_centers: labels {tuple(labels.shape)} for N={len(embeddings)}")
    bad = ((labels < 0) | (labels >= c)).nonzero()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"clean_sub_centers: label {int(labels[i])} of image {i} not in [0, {c})")
    w = F.normalize(centers.double(), dim=2)
    x = F.normalize(embeddings.double(), dim=1)
    cos = torch.einsum("nd,nkd->nk", x, w[labels])  # [N, K] to the own class's sub-centres
    nearest = cos.argmax(dim=1)
    counts = torch.zeros(c, k, dtype=torch.long).index_put_(
        (labels, nearest), torch.ones_like(labels), accumulate=True
    )
    dominant = counts.argmax(dim=1)  # ties: the lowest index
    own = dominant[labels]
    angle = torch.rad2deg(torch.arccos(cos.gather(1, own[:, None]).squeeze(1).clamp(-1, 1)))
    return SubCenterCleaning(
        dominant=dominant,
        centers=centers[torch.arange(c), dominant],
        counts=counts,
        nearest=nearest,
        angle_to_dominant=angle.float(),
        outliers=torch.nonzero(nearest != own).squeeze(1),
    )


def checkpoint_sub_centers(path: str | Path) -> tuple[torch.Tensor, dict]:
    """The ``[C, K, D]`` sub-centres of a training checkpoint (every loss shard file, read by
    :func:`~dist_train.partial_fc.state.checkpoint_class_centers`), and the checkpoint's main
    state (backbone, config…).

    Raises:
        ValueError: the checkpoint's classifier has no sub-centres (naming the file and key).
    """
    centers, state = checkpoint_class_centers(path)
    k = centers.shape[1] if centers.dim() == 3 else 1
    if k < 2:
        raise ValueError(
            f"{path}: its Partial FC state has key 'sub_centers' = {k}; the cleaning needs a "
            "Sub-center ArcFace run"
        )
    return centers, state
