"""The class-sharded state format shared by Partial FC and the sharded center loss.

Owns the layout of a state whose rows are defined per class, not per rank, and the operations
on it: build this rank's state (:func:`make_state`), merge the states written by every rank of
a run of any world size (:func:`merge_states`), pick the slices of the classes this rank owns
(:func:`select_owned`) and read them a chunk at a time (:func:`owned_chunks`), also out of
states that stay in their files (:class:`StoredState`), gather every rank's state
(:func:`gather_states`) and read a full ``[C, ...]`` matrix back (:func:`full_rows`, for
offline use). Does not own what the rows mean, the optimizer or how loaded rows are applied
(the owners do: :mod:`dist_train.partial_fc`, :mod:`dist_train.center_loss`), nor the files
(:mod:`dist_train.checkpoint`).

A state::

    {"format": the owner's tag ("partial_fc", "center_loss"), "version": 1,
     "num_classes": C, "embedding_size": D,
     "optimizer": the owner's optimizer header (name, hyper-parameters, ...) or None,
     "pieces": [{"start": a, "stop": b,        # the piece holds classes [a, b)
                 <name>: [b - a, D] rows,      # "weight" (Partial FC), "centers" (center loss)
                 "rows": {name: [b - a, ...]}, # per-class optimizer state
                 ...},                         # owner extras ("sampler")
                ...]}

A rank's state holds one piece; a merged state holds the pieces of every rank, sorted by class.
Tensors alias the live ones, like ``nn.Module.state_dict``.

Loading at scale: a rank reads only the pieces whose class ranges overlap its own, and only the
overlapping rows. A :class:`StoredState` knows its pieces' ranges without opening its file
(the main checkpoint records them) and is opened memory-mapped once per chunk of
:data:`CHUNK_BYTES`, then dropped, so a load holds at most one chunk of file pages beside the
rank's own shard: no full ``[C, D]`` matrix exists anywhere on the way.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from dist_train.distributed import all_gather_object

VERSION = 1

CHUNK_BYTES = 16 * 2**20
"""Bytes of rows (all of a piece's row tensors together) read from a stored state at a time."""


def make_state(
    fmt: str,
    *,
    num_classes: int,
    embedding_size: int,
    start: int,
    stop: int,
    tensors: dict[str, torch.Tensor],
    optimizer_rows: dict[str, torch.Tensor],
    optimizer: Any = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """This rank's state: one piece holding classes ``[start, stop)``.

    Args:
        fmt: the owner's format tag.
        num_classes, embedding_size: C and D of the whole matrix.
        start, stop: the classes of this rank.
        tensors: the rows by name, each ``[stop - start, ...]``.
        optimizer_rows: per-class optimizer state, each ``[stop - start, ...]``.
        optimizer: the owner's optimizer header (``None`` without an optimizer).
        extra: further keys of the piece.
    """
    piece: dict[str, Any] = {
        "start": int(start),
        "stop": int(stop),
        **tensors,
        "rows": dict(optimizer_rows),
        **(extra or {}),
    }
    return {
        "format": fmt,
        "version": VERSION,
        "num_classes": int(num_classes),
        "embedding_size": int(embedding_size),
        "optimizer": optimizer,
        "pieces": [piece],
    }


def merge_states(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Joins the states of every rank (or already merged states) into one with every piece.

    The header (format, C, D, optimizer) is the first state's.

    Raises:
        ValueError: no states, the states disagree on format, C or D, or their class ranges
            overlap.
    """
    if not states:
        raise ValueError("no class-sharded states to merge")
    first = states[0]
    fmt = first.get("format")
    pieces = []
    for st in states:
        for key in ("format", "num_classes", "embedding_size"):
            if st.get(key) != first.get(key):
                raise ValueError(
                    f"{fmt} states disagree on {key}: {st.get(key)!r} vs {first.get(key)!r}"
                )
        pieces.extend(st["pieces"])
    pieces.sort(key=lambda p: p["start"])
    for prev, nxt in zip(pieces, pieces[1:]):
        if nxt["start"] < prev["stop"]:
            raise ValueError(
                f"{fmt} state pieces overlap: [{prev['start']}, {prev['stop']}) and "
                f"[{nxt['start']}, {nxt['stop']})"
            )
    return {**first, "pieces": pieces}


def check_header(
    state: dict[str, Any], fmt: str, num_classes: int, embedding_size: int, who: str
) -> None:
    """Raises ``ValueError`` naming the key when ``state`` is not ``fmt`` with this C and D."""
    for key, want in (
        ("format", fmt),
        ("num_classes", num_classes),
        ("embedding_size", embedding_size),
    ):
        if state.get(key) != want:
            raise ValueError(f"{who} state: key {key!r} is {state.get(key)!r}, expected {want!r}")


class StoredState:
    """A class-sharded state kept in a file, opened (memory-mapped) only to read from it.

    Args:
        open_state: returns the state, its tensors memory-mapped from the file; called once per
            chunk of rows read, the state being dropped after each chunk.
        ranges: the class ranges ``(start, stop)`` of its pieces as recorded beside the file,
            or ``None`` (old checkpoints): then they are read from the file when first needed.
        name: names the file (and the part in it) in messages.
    """

    def __init__(
        self,
        open_state: Callable[[], dict[str, Any]],
        ranges: Sequence[Sequence[int]] | None,
        name: str,
    ) -> None:
        self._open_state = open_state
        self.recorded = ranges is not None
        self._ranges = None if ranges is None else [(int(a), int(b)) for a, b in ranges]
        self.name = name

    def ranges(self) -> list[tuple[int, int]]:
        """The class ranges of the pieces, in piece order (opens the file if none were recorded)."""
        if self._ranges is None:
            self._ranges = piece_ranges(self.open())
        return self._ranges

    def open(self) -> dict[str, Any]:
        """The state, memory-mapped; raises naming the file when it contradicts its ranges."""
        state = self._open_state()
        if self._ranges is not None and piece_ranges(state) != self._ranges:
            raise ValueError(
                f"{self.name}: its pieces hold classes {piece_ranges(state)}, the checkpoint "
                f"records {self._ranges}"
            )
        return state

    def __repr__(self) -> str:
        return f"StoredState({self.name})"


Source = dict[str, Any] | StoredState
"""A state in memory (one rank's or merged) or one kept in its file."""


def piece_ranges(state: dict[str, Any]) -> list[tuple[int, int]]:
    """The class ranges ``(start, stop)`` of the pieces of ``state``, in piece order."""
    return [(int(p["start"]), int(p["stop"])) for p in state["pieces"]]


def open_source(source: Source) -> dict[str, Any]:
    """The state of ``source`` (a stored one is opened, memory-mapped)."""
    return source.open() if isinstance(source, StoredState) else source


def select_owned(
    sources: Sequence[Source], start: int, stop: int
) -> list[tuple[slice, slice, Source, int]]:
    """The parts of ``sources`` that hold classes of ``[start, stop)``, in class order.

    A :class:`StoredState` whose recorded ranges miss ``[start, stop)`` is never opened.

    Returns:
        ``(dst, src, source, i)`` per overlapping piece: rows ``dst`` of the local shard (0 is
        class ``start``) are rows ``src`` of piece ``i`` of ``source``.

    Raises:
        ValueError: two pieces hold the same class.
    """
    found = []
    for source in sources:
        ranges = source.ranges() if isinstance(source, StoredState) else piece_ranges(source)
        found.extend((a, b, source, i) for i, (a, b) in enumerate(ranges))
    found.sort(key=lambda f: f[0])
    for prev, nxt in zip(found, found[1:]):
        if nxt[0] < prev[1]:
            raise ValueError(
                f"class-sharded state pieces overlap: [{prev[0]}, {prev[1]}) and "
                f"[{nxt[0]}, {nxt[1]})"
            )
    out = []
    for p_start, p_stop, source, i in found:
        a, b = max(start, p_start), min(stop, p_stop)
        if a < b:
            out.append((slice(a - start, b - start), slice(a - p_start, b - p_start), source, i))
    return out


def check_sources(
    parts: Sequence[tuple[slice, slice, Source, int]],
    sources: Sequence[Source],
    fmt: str,
    num_classes: int,
    embedding_size: int,
    who: str,
) -> dict[str, Any]:
    """Checks the header of every source in ``parts`` (the first source when none); returns
    the first one's header (the state without its pieces)."""
    distinct: list[Source] = []
    for _, _, source, _ in parts:
        if not any(source is d for d in distinct):
            distinct.append(source)
    header: dict[str, Any] | None = None
    for source in distinct or list(sources[:1]):
        state = open_source(source)
        check_header(state, fmt, num_classes, embedding_size, who)
        if header is None:
            header = {k: v for k, v in state.items() if k != "pieces"}
    if header is None:
        raise ValueError(f"{who}: no class-sharded states to load")
    return header


def owned_chunks(
    parts: Sequence[tuple[slice, slice, Source, int]], chunk_bytes: int | None = None
) -> Iterator[tuple[slice, slice, dict[str, Any]]]:
    """``(dst, src, piece)`` for the rows of ``parts`` (of :func:`select_owned`).

    A part of a state in memory comes whole. A part of a :class:`StoredState` comes in chunks
    of about ``chunk_bytes`` (default :data:`CHUNK_BYTES`) of rows, its file opened
    memory-mapped for each chunk and dropped after it: copy out of ``piece`` before asking for
    the next chunk and keep no reference to its tensors, so only one chunk of the file's pages
    is ever resident.
    """
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    for dst, src, source, i in parts:
        if not isinstance(source, StoredState):
            yield dst, src, source["pieces"][i]
            continue
        n, at, step = src.stop - src.start, 0, 0
        while at < n:
            piece = source.open()["pieces"][i]
            if not step:
                step = max(1, chunk_bytes // max(1, _row_bytes(piece)))
            b = min(n, at + step)
            yield (
                slice(dst.start + at, dst.start + b),
                slice(src.start + at, src.start + b),
                piece,
            )
            del piece  # unmaps the chunk's pages before the next one is read
            at = b


def _row_bytes(piece: dict[str, Any]) -> int:
    """Bytes of one class's row across the piece's row tensors (optimizer rows included)."""
    tensors = [v for v in piece.values() if torch.is_tensor(v) and v.dim() >= 1]
    tensors += [v for v in piece.get("rows", {}).values() if v.dim() >= 1]
    return sum(v[:1].numel() * v.element_size() for v in tensors)


def check_covered(
    parts: Sequence[tuple[slice, Any, Any] | tuple[slice, Any, Any, Any]],
    start: int,
    stop: int,
    *,
    who: str,
    rank: int,
) -> None:
    """Raises ``ValueError`` when ``parts`` (of :func:`select_owned`) miss classes of the range."""
    covered = sum(p[0].stop - p[0].start for p in parts)
    if covered != stop - start:
        raise ValueError(
            f"{who} state covers {covered} of the {stop - start} classes "
            f"[{start}, {stop}) of rank {rank}"
        )


def gather_states(local: dict[str, Any]) -> dict[str, Any]:
    """Every rank's state, merged, on every rank (CPU tensors; collective, for small C)."""
    for piece in local["pieces"]:
        for key, value in piece.items():
            if torch.is_tensor(value):
                piece[key] = value.cpu()
        piece["rows"] = {k: v.cpu() for k, v in piece["rows"].items()}
    return merge_states(all_gather_object(local))


def full_rows(state: dict[str, Any], *path: str) -> torch.Tensor:
    """The ``[C, ...]`` matrix at ``path`` in each piece of a merged state, in class order.

    ``full_rows(state, "weight")`` or ``full_rows(state, "rows", "momentum_buffer")``.

    Raises:
        ValueError: the pieces do not cover ``[0, C)``.
    """
    parts, at = [], 0
    for piece in state["pieces"]:
        if piece["start"] != at:
            break
        value = piece
        for key in path:
            value = value[key]
        parts.append(value)
        at = piece["stop"]
    if at != state["num_classes"]:
        raise ValueError(
            f"{state.get('format')} state: its pieces do not cover the classes "
            f"[0, {state['num_classes']})"
        )
    return torch.cat(parts)
