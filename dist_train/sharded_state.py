"""The class-sharded state format shared by Partial FC and the sharded center loss.

Owns the layout of a state whose rows are defined per class, not per rank, and the operations
on it: build this rank's state (:func:`make_state`), merge the states written by every rank of
a run of any world size (:func:`merge_states`), pick the slices of the classes this rank owns
(:func:`owned_slices`), gather every rank's state (:func:`gather_states`) and read a full
``[C, ...]`` matrix back (:func:`full_rows`). Does not own what the rows mean, the optimizer
or how loaded rows are applied (the owners do: :mod:`dist_train.partial_fc`,
:mod:`dist_train.center_loss`).

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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from dist_train.distributed import all_gather_object

VERSION = 1


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


def owned_slices(
    state: dict[str, Any], start: int, stop: int
) -> list[tuple[slice, slice, dict[str, Any]]]:
    """The parts of ``state`` that hold classes of ``[start, stop)``.

    Returns:
        ``(dst, src, piece)`` per overlapping piece: rows ``dst`` of the local shard (0 is
        class ``start``) are rows ``src`` of the piece's tensors.
    """
    out = []
    for piece in state["pieces"]:
        a, b = max(start, piece["start"]), min(stop, piece["stop"])
        if a < b:
            dst = slice(a - start, b - start)
            out.append((dst, slice(a - piece["start"], b - piece["start"]), piece))
    return out


def check_covered(
    parts: Sequence[tuple[slice, slice, dict[str, Any]]],
    start: int,
    stop: int,
    *,
    who: str,
    rank: int,
) -> None:
    """Raises ``ValueError`` when ``parts`` (of :func:`owned_slices`) miss classes of the range."""
    covered = sum(dst.stop - dst.start for dst, _, _ in parts)
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
