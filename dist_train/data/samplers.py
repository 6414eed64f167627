"""Distributed, deterministic, resumable samplers over labelled images.

Owns: the order in which each rank visits the images in an epoch, for the recipes in use:
plain shuffling, a per-identity cap (at most K images of each identity per epoch, redrawn every
epoch), a fixed per-identity fraction r, and M-per-class batches (each global batch holds M
images of each of its classes, no class twice in a global batch across ranks). Does not own:
reading images or building the DataLoader (:mod:`dist_train.data.datasets`).

Every sampler first builds the *global* order of an epoch from ``(seed, epoch)`` alone, the
same on every rank, cut to a whole number of global batches of ``batch_size * world_size``
images. Global batch ``g`` is split in rank order: rank ``r`` gets positions
``[r * batch_size, (r + 1) * batch_size)`` of it. So ranks never overlap, and a resumed run
skips exactly the global batches already consumed; on another world size or batch size
(``load_state_dict(state, reshard=True)``) it skips the images already consumed, rounded down to
a whole global batch of the new size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

SAMPLERS = ("shuffle", "identity_cap", "identity_ratio", "m_per_class")


class EpochSampler:
    """Base class: per-rank view of a seeded global order, with mid-epoch resume.

    Args:
        labels: ``[N]`` int identity of every image (0..C-1).
        batch_size: images per rank per batch (B_local).
        rank: this rank.
        world_size: number of ranks.
        seed: seed of the order (with the epoch).

    Subclasses implement :meth:`global_order`.
    """

    name = "base"

    def __init__(self, labels, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in a world of size {world_size}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.labels = np.asarray(labels, dtype=np.int64)
        self.batch_size = int(batch_size)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.epoch = 0
        self._resume_epoch: int | None = None
        self._resume_batches = 0
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def _rng(self, epoch: int | None) -> np.random.Generator:
        """Generator of one epoch's draws, or (``None``) of the run-long, epoch-free draws."""
        stream = [1] if epoch is None else [0, epoch]
        return np.random.default_rng([self.seed, *stream])

    def global_order(self, epoch: int) -> np.ndarray:
        """``[num_batches * B * W]`` image indices of ``epoch`` (identical on every rank)."""
        raise NotImplementedError

    def _cut(self, order: np.ndarray) -> np.ndarray:
        n = len(order) // self.global_batch_size * self.global_batch_size
        return order[:n]

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global order of ``epoch`` cut to whole global batches (cached for one epoch)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            order = self._cut(np.asarray(self.global_order(epoch), dtype=np.int64))
            self._order_cache = (epoch, order)
        return self._order_cache[1]

    def rank_indices(self, epoch: int | None = None) -> np.ndarray:
        """This rank's indices for a whole epoch, ``[num_batches * B]``."""
        order = self.epoch_order(self.epoch if epoch is None else epoch)
        return order.reshape(-1, self.world_size, self.batch_size)[:, self.rank].reshape(-1)

    @property
    def num_batches(self) -> int:
        """Batches per epoch on each rank (the same on every rank)."""
        return len(self.epoch_order(self.epoch)) // self.global_batch_size

    def __len__(self) -> int:
        """Images this rank visits in a full epoch (``num_batches * batch_size``)."""
        return self.num_batches * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch; a pending resume position is kept only for its own epoch."""
        self.epoch = int(epoch)
        if self._resume_epoch is not None and self._resume_epoch != self.epoch:
            self._resume_epoch, self._resume_batches = None, 0

    def __iter__(self) -> Iterator[int]:
        idx = self.rank_indices()
        start = 0
        if self._resume_epoch == self.epoch:
            # consumed once: the next pass over any epoch starts at its beginning
            start = self._resume_batches * self.batch_size
            self._resume_epoch, self._resume_batches = None, 0
        return iter(idx[start:].tolist())

    def state_dict(self, batches_consumed: int = 0) -> dict[str, Any]:
        """Position to resume from: the epoch and the batches already consumed in it."""
        if not 0 <= batches_consumed <= self.num_batches:
            raise ValueError(
                f"batches_consumed={batches_consumed} is not in [0, {self.num_batches}]"
            )
        return {
            "sampler": self.name,
            "seed": self.seed,
            "epoch": self.epoch,
            "batches_consumed": int(batches_consumed),
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_images": len(self.labels),
        }

    def load_state_dict(self, state: dict[str, Any], *, reshard: bool = False) -> int:
        """Restores a position; the next iteration of that epoch skips the consumed batches.

        Args:
            state: from :meth:`state_dict`.
            reshard: accept a state saved with another batch size or world size. The epoch's
                global order does not depend on them, so the position continues after the
                images already consumed, rounded down to a whole global batch of this sampler.

        Returns:
            The batches of the epoch this rank counts as consumed (what a trainer resumes its
            own count from).

        Raises:
            ValueError: the state was saved with another sampler, seed, data set size or (unless
                ``reshard``) batch size or world size: the order would differ, so the position
                means nothing.
        """
        mine = self.state_dict(0)
        state = dict(state)
        if reshard and (state["world_size"], state["batch_size"]) != (
            mine["world_size"],
            mine["batch_size"],
        ):
            consumed = state["batches_consumed"] * state["batch_size"] * state["world_size"]
            state.update(
                world_size=mine["world_size"],
                batch_size=mine["batch_size"],
                batches_consumed=consumed // self.global_batch_size,
            )
        for key in ("sampler", "seed", "batch_size", "world_size", "num_images"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this run has {mine[key]!r}; "
                    "mid-epoch resume needs the same data, sampler, seed, batch and world size"
                )
        self.set_epoch(int(state["epoch"]))
        self._resume_epoch = self.epoch
        self._resume_batches = int(state["batches_consumed"])
        return self._resume_batches

    def _by_class(self) -> list[np.ndarray]:
        order = np.argsort(self.labels, kind="stable")
        counts = np.bincount(self.labels) if len(self.labels) else np.zeros(0, np.int64)
        return np.split(order, np.cumsum(counts)[:-1]) if len(counts) else []


class ShuffleSampler(EpochSampler):
    """Every image once per epoch, in a seeded random order."""

    name = "shuffle"

    def global_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).permutation(len(self.labels))


class IdentityCapSampler(EpochSampler):
    """At most ``max_per_identity`` images of each identity per epoch, redrawn every epoch."""

    name = "identity_cap"

    def __init__(self, labels, batch_size, rank=0, world_size=1, seed=0, *, max_per_identity=200):
        super().__init__(labels, batch_size, rank, world_size, seed)
        if max_per_identity < 1:
            raise ValueError(f"max_per_identity must be >= 1, got {max_per_identity}")
        self.max_per_identity = int(max_per_identity)
        self._classes = self._by_class()

    def global_order(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        chosen = [
            idx
            if len(idx) <= self.max_per_identity
            else rng.choice(idx, self.max_per_identity, replace=False)
            for idx in self._classes
        ]
        pool = np.concatenate(chosen) if chosen else np.zeros(0, np.int64)
        return rng.permutation(pool)


class IdentityRatioSampler(EpochSampler):
    """A fixed fraction ``ratio`` of each identity's images (at least one), shuffled per epoch.

    The subset is drawn once from the seed and kept for the whole run.
    """

    name = "identity_ratio"

    def __init__(self, labels, batch_size, rank=0, world_size=1, seed=0, *, ratio=1.0):
        super().__init__(labels, batch_size, rank, world_size, seed)
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must be in (0, 1], got {ratio}")
        self.ratio = float(ratio)
        rng = self._rng(None)  # epoch-free stream: the subset never changes
        parts = []
        for idx in self._by_class():
            if len(idx) == 0:
                continue
            k = max(1, int(round(self.ratio * len(idx))))
            parts.append(np.sort(rng.choice(idx, k, replace=False)))
        self.subset = np.concatenate(parts) if parts else np.zeros(0, np.int64)

    def global_order(self, epoch: int) -> np.ndarray:
        return self._rng(epoch).permutation(self.subset)


class MPerClassSampler(EpochSampler):
    """Global batches made of groups of ``m`` images of one class, no class twice per batch.

    Each class yields ``max(1, n_c // m)`` groups per epoch (drawn without replacement; a class
    with fewer than ``m`` images is sampled with replacement). Groups are shuffled and packed
    greedily into global batches of ``B * W / m`` distinct classes. ``batch_size`` must be a
    multiple of ``m`` so every rank's batch holds whole groups.
    """

    name = "m_per_class"

    def __init__(self, labels, batch_size, rank=0, world_size=1, seed=0, *, m=2):
        super().__init__(labels, batch_size, rank, world_size, seed)
        if m < 1 or batch_size % m:
            raise ValueError(f"batch_size {batch_size} must be a multiple of m_per_class={m}")
        self.m = int(m)
        self._classes = [c for c in self._by_class() if len(c)]
        self.classes_per_batch = self.global_batch_size // self.m
        if len(self._classes) < self.classes_per_batch:
            raise ValueError(
                f"m_per_class needs {self.classes_per_batch} distinct classes per global batch "
                f"(batch {batch_size} x world {world_size} / m {m}) but the data has "
                f"{len(self._classes)}"
            )

    def global_order(self, epoch: int) -> np.ndarray:
        rng = self._rng(epoch)
        m = self.m
        groups: list[np.ndarray] = []
        for idx in self._classes:
            if len(idx) < m:
                groups.append(rng.choice(idx, m, replace=True))
                continue
            perm = rng.permutation(idx)
            groups.extend(perm[: len(idx) // m * m].reshape(-1, m))
        order = rng.permutation(len(groups))
        per = self.classes_per_batch
        batches: list[np.ndarray] = []
        current: list[np.ndarray] = []
        seen: set[int] = set()
        pending: list[np.ndarray] = []
        for gi in order:
            g = groups[gi]
            cls = int(self.labels[g[0]])
            if cls in seen:
                pending.append(g)
                continue
            current.append(g)
            seen.add(cls)
            if len(current) == per:
                batches.append(np.concatenate(current))
                current, seen = [], set()
                # deferred groups go first into the next batch, one per class
                keep = []
                for p in pending:
                    pc = int(self.labels[p[0]])
                    if pc in seen or len(current) == per:
                        keep.append(p)
                    else:
                        current.append(p)
                        seen.add(pc)
                pending = keep
                if len(current) == per:
                    batches.append(np.concatenate(current))
                    current, seen = [], set()
        if not batches:
            return np.zeros(0, np.int64)
        return np.concatenate(batches)


def build_sampler(
    name: str,
    labels,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    *,
    max_images_per_identity: int = 200,
    identity_ratio: float = 1.0,
    m_per_class: int = 2,
) -> EpochSampler:
    """Sampler by its config name (``data.sampler``)."""
    if name == "shuffle":
        return ShuffleSampler(labels, batch_size, rank, world_size, seed)
    if name == "identity_cap":
        return IdentityCapSampler(
            labels, batch_size, rank, world_size, seed, max_per_identity=max_images_per_identity
        )
    if name == "identity_ratio":
        return IdentityRatioSampler(
            labels, batch_size, rank, world_size, seed, ratio=identity_ratio
        )
    if name == "m_per_class":
        return MPerClassSampler(labels, batch_size, rank, world_size, seed, m=m_per_class)
    raise ValueError(f"unknown sampler {name!r}; choose one of {list(SAMPLERS)}")
