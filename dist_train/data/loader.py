"""The training DataLoader: dataset + distributed sampler + seeded augmentation.

Owns: :func:`build_train_data` (the data layer's contract with the trainer) and
:class:`TrainData`. Does not own: reading formats (:mod:`.datasets`), sampling order
(:mod:`.samplers`) or the augmentation itself (:mod:`.transforms`).

Augmentation is seeded per sample from ``(seed, epoch, rank, position)``, so batches do not
depend on the number of workers and a resumed epoch continues with identical batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from .datasets import DataError, LabelledImages, open_train_dataset
from .samplers import EpochSampler, build_sampler
from .transforms import TrainTransform


def _collate(batch):
    """``[B, 3, H, W]`` uint8 images (a channels_last-strided view) and int64 labels.

    Stacking the HWC images and permuting the axes avoids a per-image HWC -> CHW copy in the
    worker: the batch is NCHW by shape and channels_last in memory, the layout convolutions
    prefer; ``normalize`` keeps it. Call ``.contiguous()`` where NCHW-contiguous is needed.
    """
    images = torch.from_numpy(np.stack([b[0] for b in batch])).permute(0, 3, 1, 2)
    labels = torch.tensor([b[1] for b in batch], dtype=torch.int64)
    return images, labels


def _worker_init(_: int) -> None:
    # one OpenCV thread per worker: the workers are the parallelism
    cv2.setNumThreads(1)


class _SeededOrder(torch.utils.data.Sampler):
    """Yields ``(index, epoch, rank, position)`` so augmentation is seeded per sample."""

    def __init__(self, sampler: EpochSampler):
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        s = self.sampler
        indices = list(iter(s))
        offset = len(s) - len(indices)  # a resumed epoch starts part-way
        for pos, i in enumerate(indices, offset):
            yield (i, s.epoch, s.rank, pos)


@dataclass
class TrainData:
    """What the trainer needs from the data layer."""

    loader: DataLoader
    """Iterable of ``(images uint8 [B, 3, H, W], labels int64 [B])``; one epoch per pass."""
    sampler: EpochSampler
    """``set_epoch(e)``, ``state_dict(batches_consumed)``, ``load_state_dict(state)``."""
    num_classes: int
    num_images: int
    dataset: LabelledImages


def build_train_data(cfg, dist, seed: int) -> TrainData:
    """Dataset, distributed sampler and DataLoader for ``cfg`` (a ``DataConfig``).

    Args:
        cfg: data section of the config.
        dist: ``DistInfo`` of this process (rank, world size, device).
        seed: run seed (sampling order and augmentation derive from it).

    Raises:
        ConfigError: ``cfg.num_classes``/``cfg.num_images`` disagree with the data.
        DataError: missing or unusable data.

    With ``num_workers > 0`` this sets OpenCV to one thread in the calling process (see the
    comment in the body): forked workers then start without a half-copied thread pool.
    """
    from dist_train.config import ConfigError

    dataset = open_train_dataset(cfg, TrainTransform.from_config(cfg))
    dataset.base_seed = int(seed)
    where = str(cfg.root)
    if cfg.num_classes and cfg.num_classes != dataset.num_classes:
        raise ConfigError(
            f"data.num_classes={cfg.num_classes} but {where} holds {dataset.num_classes} "
            "identities (set 0 to derive it from the data)"
        )
    if cfg.num_images and cfg.num_images != len(dataset):
        raise ConfigError(
            f"data.num_images={cfg.num_images} but {where} holds {len(dataset)} images "
            "(set 0 to derive it from the data)"
        )
    sampler = build_sampler(
        cfg.sampler,
        dataset.labels,
        cfg.batch_size,
        dist.rank,
        dist.world_size,
        seed,
        max_images_per_identity=cfg.max_images_per_identity,
        identity_ratio=cfg.identity_ratio,
        m_per_class=cfg.m_per_class,
    )
    if sampler.num_batches == 0:
        raise DataError(
            f"{where}: {sampler.name} sampler yields fewer than one global batch "
            f"({cfg.batch_size} x {dist.world_size} images) per epoch"
        )
    workers = int(cfg.num_workers)
    if workers:
        # DataLoader workers are forked from this process. OpenCV's thread pool does not
        # survive a fork: a child forked while pool threads held a lock deadlocked in its
        # first OpenCV call here. One OpenCV thread in this process (the trainer decodes
        # nothing itself) removes the pool before any fork.
        cv2.setNumThreads(1)
    loader = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=_SeededOrder(sampler),
        num_workers=workers,
        collate_fn=_collate,
        drop_last=True,
        pin_memory=getattr(dist.device, "type", "cpu") == "cuda",
        worker_init_fn=_worker_init if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    return TrainData(loader, sampler, dataset.num_classes, len(dataset), dataset)
