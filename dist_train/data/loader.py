"""The training DataLoader: dataset + distributed sampler + seeded augmentation.

Owns: :func:`build_train_data` (the data layer's contract with the trainer),
:class:`TrainData`, the batch fetch (each worker decodes and augments a whole batch straight
into one uint8 array) and the worker -> trainer transport of those arrays through a reused
shared-memory ring. Does not own: reading formats (:mod:`.datasets`), sampling order
(:mod:`.samplers`) or the augmentation itself (:mod:`.transforms`).

Augmentation is seeded per sample from ``(seed, epoch, rank, position)``, so batches do not
depend on the number of workers and a resumed epoch continues with identical batches.

Transport: torch's DataLoader moves each batch a worker returns into a *new* shared-memory
segment; on Linux the first touch of those fresh pages costs about half a JPEG decode per
image. Here the workers write into slots of a ring of shared pages mapped once, before the
workers fork, and send only ``(slot, labels)``; the trainer gets a zero-copy tensor over the
slot, and the slot is free again when the last reference to that tensor goes (a pinned copy
for CUDA, the next batch on CPU). A worker that finds none of its slots free (a caller holding
many batches) falls back to a fresh array, so holding batches is always safe.
"""

from __future__ import annotations

import itertools
import mmap
import multiprocessing
import signal
import sys
import weakref
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from .datasets import DataError, LabelledImages, open_train_dataset
from .errors import DataConfigError
from .samplers import EpochSampler, build_sampler
from .transforms import TrainTransform


def _as_batch(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, 3, H, W]`` uint8 images (a channels_last-strided view) and int64 labels.

    The HWC batch permuted to NCHW by shape is channels_last in memory, the layout
    convolutions prefer; ``normalize`` keeps it. Call ``.contiguous()`` where NCHW-contiguous
    is needed.
    """
    return (
        torch.from_numpy(images).permute(0, 3, 1, 2),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def _collate(batch):
    """``_BatchFetch.__getitems__`` returns whole batches: nothing is left to collate."""
    return batch


_RINGS: weakref.WeakValueDictionary[int, _SlotRing] = weakref.WeakValueDictionary()
_RING_IDS = itertools.count()


class _SlotView(np.ndarray):
    """A ring slot handed to the trainer; freeing the last reference frees the slot."""

    def __del__(self):
        release = self.__dict__.get("_release")
        if release is not None:
            release()


class _SlotRing:
    """``workers x slots_per_worker`` batch arrays in anonymous shared memory.

    Created in the trainer process before the workers fork, so every worker writes into the
    same pages the trainer reads (nothing is copied or faulted in per batch). Worker ``w`` owns
    slots ``[w * k, (w + 1) * k)``: it marks a free slot busy (flag 1), the trainer marks it
    free (flag 0) when the batch's tensor is gone; each flag has one writer per transition.
    """

    def __init__(self, workers: int, slots_per_worker: int, batch: int, size: int):
        self.k = slots_per_worker
        self.shape = (batch, size, size, 3)
        n = workers * slots_per_worker
        nbytes = int(np.prod(self.shape))
        self._pages = mmap.mmap(-1, n * nbytes)  # MAP_SHARED | MAP_ANONYMOUS
        self._flag_page = mmap.mmap(-1, max(n, 1))
        self.slots = np.frombuffer(self._pages, np.uint8).reshape(n, *self.shape)
        self.flags = np.frombuffer(self._flag_page, np.uint8)
        self.slots.fill(0)  # fault the pages in here (the trainer reads them) ...
        self.id = next(_RING_IDS)
        _RINGS[self.id] = self

    def touch(self, worker: int) -> None:
        """... and in each worker for its own slots: a forked child faults shared pages in
        again on its first write, which would otherwise land on its first batches."""
        self.slots[worker * self.k : (worker + 1) * self.k].fill(0)

    def claim(self, worker: int) -> int:
        """A free slot of ``worker`` marked busy, or -1 when all of them are in use."""
        flags = self.flags
        for s in range(worker * self.k, (worker + 1) * self.k):
            if flags[s] == 0:
                flags[s] = 1
                return s
        return -1

    def open(self, slot: int, n: int) -> np.ndarray:
        """The first ``n`` images of ``slot``, freed for reuse when the returned array dies."""
        view = self.slots[slot, :n].view(_SlotView)
        flags = self.flags

        def release() -> None:
            flags[slot] = 0

        view._release = release
        return view


class _RingBatch:
    """What a worker returns for a batch written into a ring slot: pickles to a few bytes."""

    __slots__ = ("ring", "slot", "labels")

    def __init__(self, ring: int, slot: int, labels: np.ndarray):
        self.ring, self.slot, self.labels = ring, slot, labels

    def __reduce__(self):
        return (_open_ring_batch, (self.ring, self.slot, self.labels))


def _open_ring_batch(ring_id: int, slot: int, labels: np.ndarray):
    ring = _RINGS.get(ring_id)
    if ring is None:  # only the process that made the loader can read its ring
        raise RuntimeError(f"data loader ring {ring_id} is not mapped in this process")
    return _as_batch(ring.open(slot, len(labels)), labels)


class _BatchFetch(torch.utils.data.Dataset):
    """The dataset as the DataLoader sees it: ``__getitems__`` builds a whole batch."""

    def __init__(self, dataset: LabelledImages, ring: _SlotRing | None, batch: int, size: int):
        self.dataset, self.ring = dataset, ring
        self.shape = (batch, size, size, 3)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        return self.dataset[item]

    def __getitems__(self, items: list):
        info, ring = get_worker_info(), self.ring
        slot = ring.claim(info.id if info is not None else 0) if ring is not None else -1
        if slot >= 0:
            try:
                labels = self.dataset.fill(items, ring.slots[slot])
                check_label_range(labels, self.dataset, items)
            except BaseException:
                ring.flags[slot] = 0
                raise
            if info is None:  # in the trainer process itself: no transport
                return _as_batch(ring.open(slot, len(labels)), labels)
            return _RingBatch(ring.id, slot, labels)
        out = np.empty((len(items),) + self.shape[1:], np.uint8)
        labels = self.dataset.fill(items, out)
        check_label_range(labels, self.dataset, items)
        return _as_batch(out, labels)


def check_label_range(labels: np.ndarray, dataset: LabelledImages, items: list) -> None:
    """Raises :class:`DataError` naming the image unless every label is in [0, C).

    Done here, on the host, as the batch is built: the training step on the device reads
    nothing back to check them (see ``docs/cluster.md``, "Host synchronisation").
    """
    num_classes = dataset.num_classes
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        item = items[i][0] if isinstance(items[i], (tuple, list, np.ndarray)) else items[i]
        where = getattr(dataset, "rec_path", None) or type(dataset).__name__
        raise DataError(
            f"{where}: image {int(item)} has label {int(labels[i])}, outside [0, {num_classes})"
        )


def _ring_supported() -> bool:
    """The ring needs forked workers (they inherit its mapping; spawned ones would not)."""
    return "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin"


def worker_init(worker: int) -> None:
    """``worker_init_fn`` of the training loader's workers (and of any DataLoader over a
    :class:`LabelledImages`): one OpenCV thread per worker, the slot ring's pages touched, and
    the stop signals ignored.

    Slurm (``scancel``, ``scontrol requeue``, preemption) sends SIGTERM to every process of a
    job, loader workers included. torch's worker handler dies on a SIGTERM that does not come
    from its parent, and the trainer then fails with "DataLoader worker ... killed by signal"
    in the middle of the step instead of checkpointing. The trainer process decides about the
    stop; a worker ends when its loader shuts it down or its parent is gone."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
    # one OpenCV thread per worker: the workers are the parallelism
    cv2.setNumThreads(1)
    info = get_worker_info()
    ring = getattr(info.dataset, "ring", None) if info is not None else None
    if ring is not None:
        ring.touch(worker)


class _SeededBatches(torch.utils.data.Sampler):
    """Batches of ``(index, epoch, rank, position)`` rows as int64 ``[B, 4]`` arrays (the
    per-sample augmentation seeds), the incomplete last batch dropped.

    One small array per batch instead of ``B`` tuples: less for the trainer process to build
    and pickle to the workers, and :meth:`LabelledImages.fill` takes the array as it is.
    """

    def __init__(self, sampler: EpochSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, int(batch_size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        s, b = self.sampler, self.batch_size
        index = np.fromiter(iter(s), np.int64)
        offset = len(s) - len(index)  # a resumed epoch starts part-way
        rows = np.empty((len(index), 4), np.int64)
        rows[:, 0], rows[:, 1], rows[:, 2] = index, s.epoch, s.rank
        rows[:, 3] = np.arange(offset, offset + len(index))
        for start in range(0, len(index) - b + 1, b):
            yield rows[start : start + b]


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


def build_train_data(cfg, dist, seed: int, *, shared_ring: bool | None = None) -> TrainData:
    """Dataset, distributed sampler and DataLoader for ``cfg`` (a ``DataConfig``).

    Args:
        cfg: data section of the config.
        dist: ``DistInfo`` of this process (rank, world size, device).
        seed: run seed (sampling order and augmentation derive from it).
        shared_ring: batches through the reused shared-memory slot ring; ``None`` (default)
            wherever workers can be forked, ``False`` for torch's own per-batch transport (the
            same batches, a fresh array each). ``True`` where workers cannot be forked is an
            error.

    Raises:
        DataConfigError: ``cfg.num_classes``/``cfg.num_images`` disagree with the data.
        DataError: missing or unusable data.

    With ``num_workers > 0`` this sets OpenCV to one thread in the calling process (see the
    comment in the body): forked workers then start without a half-copied thread pool.
    """
    dataset = open_train_dataset(cfg, TrainTransform.from_config(cfg))
    dataset.base_seed = int(seed)
    where = str(cfg.root)
    if cfg.num_classes and cfg.num_classes != dataset.num_classes:
        raise DataConfigError(
            f"data.num_classes={cfg.num_classes} but {where} holds {dataset.num_classes} "
            "identities (set 0 to derive it from the data)"
        )
    if cfg.num_images and cfg.num_images != len(dataset):
        raise DataConfigError(
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
    prefetch = int(cfg.prefetch_factor)
    size, context = dataset.transform.image_size, None
    if shared_ring is None:
        shared_ring = not workers or _ring_supported()
    elif shared_ring and workers and not _ring_supported():
        raise DataError("shared_ring=True needs forked workers, which this platform lacks")
    if not shared_ring:
        ring = None
    elif not workers:
        # reused batch arrays in this process too: a fresh 5 MB array per batch would be
        # faulted in page by page (the trainer holds one batch while the next is built)
        ring = _SlotRing(1, 2, cfg.batch_size, size)
    else:
        # prefetch batches in flight per worker, one held by the trainer, one being released
        ring = _SlotRing(workers, prefetch + 2, cfg.batch_size, size)
        context = multiprocessing.get_context("fork")
    loader = DataLoader(
        _BatchFetch(dataset, ring, cfg.batch_size, size),
        batch_sampler=_SeededBatches(sampler, cfg.batch_size),
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=getattr(dist.device, "type", "cpu") == "cuda",
        worker_init_fn=worker_init if workers else None,
        multiprocessing_context=context,
        persistent_workers=workers > 0,
        prefetch_factor=prefetch if workers else None,
    )
    return TrainData(loader, sampler, dataset.num_classes, len(dataset), dataset)
