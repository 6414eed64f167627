"""World-size-free state of a Partial FC classifier: build, load, merge, export.

Owns the Partial FC use of the class-sharded format of :mod:`dist_train.sharded_state`
(format tag ``"partial_fc"``): what a rank's piece holds (its rows ``weight``, its optimizer
rows, its negative-sampling stream), the margin head's running state in the header (one copy,
not per class), copying the rows of this rank's classes out of pieces
written by any world size (in memory, or stored in checkpoint files, which are read only where
they overlap this rank's classes, a chunk at a time), and the full ``[C, D]`` class-centre matrix
(:func:`export_class_centers` from a live module, :func:`checkpoint_class_centers` from a
training checkpoint's files). A classifier with K sub-centres per class stores its rows
``[C_local, K, D]`` (optimizer rows likewise) and its header says ``sub_centers: K``: a
class's K rows travel together, so the state stays per class and world-size free. Does not
own the layout or the merge of pieces (:mod:`dist_train.sharded_state`), nor how the module
applies optimizer rows that arrive before its optimizer (:class:`dist_train.partial_fc.PartialFC`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from dist_train import checkpoint as ckpt
from dist_train.collectives import all_gather_no_grad
from dist_train.partial_fc.dtypes import master_dtype
from dist_train.sharded_state import (
    Source,
    StoredState,
    check_covered,
    check_header,
    check_sources,
    full_rows,
    make_state,
    merge_states,
    owned_chunks,
    select_owned,
)

if TYPE_CHECKING:
    from dist_train.partial_fc.module import PartialFC

FORMAT = "partial_fc"
"""Format tag of a Partial FC state."""

HEAD_KEY = "margin_head"
"""Header key of the margin head's ``state_dict`` (its running state; ``{}`` for most heads)."""


def build_shard_state(pfc: PartialFC) -> dict[str, Any]:
    """This rank's rows and optimizer rows, tagged with their class range (see the module)."""
    opt = None
    if pfc.optimizer is not None:
        opt = {"name": pfc.optimizer.name, **pfc.optimizer.hyperparameters()}
    k = pfc.sub_centers
    rows = pfc.optimizer.rows if pfc.optimizer is not None else {}
    if k > 1:  # per class: [C_local, K, ...]
        rows = {n: v.unflatten(0, (pfc.num_local, k)) for n, v in rows.items()}
    state = make_state(
        FORMAT,
        num_classes=pfc.num_classes,
        embedding_size=pfc.embedding_size,
        start=pfc.class_start,
        stop=pfc.class_stop,
        tensors={"weight": _per_class(pfc, pfc.weight.detach())},
        optimizer_rows=rows,
        optimizer=opt,
        # the negative-sampling stream, so a resume at the same world size draws the same
        # negatives as the uninterrupted run (another world size reseeds)
        extra={"sampler": pfc.sampler_state()},
    )
    # The margin head's running state (EMA buffers, draw counter) is one value for the whole
    # model, the same on every rank: it goes in the header, not in a class piece, so a merged
    # state holds it once and any rank finds it in whichever piece files it opens.
    state[HEAD_KEY] = pfc.margin.state_dict()
    if k > 1:
        state["sub_centers"] = k
    return state


def load_head_state(pfc: PartialFC, saved: dict[str, Any] | None) -> None:
    """Restores the margin head's running state from a state header's :data:`HEAD_KEY`.

    A state without the key (written before heads had state) loads into a head without
    state.

    Raises:
        ValueError: naming the key, when the saved entries do not match the head's.
    """
    want = pfc.margin.state_dict()
    saved = {} if saved is None else saved
    if set(saved) != set(want):
        raise ValueError(
            f"PartialFC state: key {HEAD_KEY!r} holds {sorted(saved)}, the margin head "
            f"{type(pfc.margin).__name__} has {sorted(want)}"
        )
    if want:
        pfc.margin.load_state_dict(saved)


def _per_class(pfc: PartialFC, rows: torch.Tensor) -> torch.Tensor:
    """``[C_local·K, ...]`` rows as ``[C_local, K, ...]`` (unchanged for K = 1)."""
    k = pfc.sub_centers
    return rows.unflatten(0, (pfc.num_local, k)) if k > 1 else rows


def read_shard_pieces(
    pfc: PartialFC,
    pieces: Source | Sequence[Source],
    apply_rows: Callable[[int, int, dict[str, torch.Tensor]], None],
    *,
    strict: bool = True,
) -> str | None:
    """Copies the rows of ``pfc``'s classes (and its sampling stream) out of ``pieces``.

    Only the pieces that overlap ``pfc``'s class range are read (a stored one a chunk at a
    time); nothing of the size of the full matrix is built.

    Args:
        pfc: the module to load into.
        pieces: one state (merged, or covering this range) or a list of them, of any world
            size, in memory or :class:`~dist_train.sharded_state.StoredState`.
        apply_rows: called with ``(first local row, stop local row, optimizer rows by name)``
            per chunk; the rows are valid only during the call (copy them).
        strict: raise when the pieces lack some of this rank's classes.

    Returns:
        The optimizer name of the state (``None`` without one).
    """
    sources = [pieces] if isinstance(pieces, (dict, StoredState)) else list(pieces)
    parts = select_owned(sources, pfc.class_start, pfc.class_stop)
    header = check_sources(parts, sources, FORMAT, pfc.num_classes, pfc.embedding_size, "PartialFC")
    if header.get("sub_centers", 1) != pfc.sub_centers:
        raise ValueError(
            f"PartialFC state: key 'sub_centers' is {header.get('sub_centers', 1)}, the head "
            f"has {pfc.sub_centers} sub-centres per class"
        )
    opt_name = header["optimizer"]["name"] if header.get("optimizer") else None
    if pfc.optimizer is not None and opt_name is not None and opt_name != pfc.optimizer.name:
        raise ValueError(
            f"PartialFC state holds {opt_name!r} optimizer rows, the configured optimizer "
            f"is {pfc.optimizer.name!r}"
        )
    if strict:
        check_covered(parts, pfc.class_start, pfc.class_stop, who="PartialFC", rank=pfc.rank)
    load_head_state(pfc, header.get(HEAD_KEY))
    own = (pfc.class_start, pfc.class_stop)
    k = pfc.sub_centers
    weight = _per_class(pfc, pfc.weight)
    for dst, src, piece in owned_chunks(parts):
        with torch.no_grad():
            weight[dst].copy_(piece["weight"][src])
        rows = {n: v[src] for n, v in piece.get("rows", {}).items()}
        if k > 1:
            rows = {n: v.flatten(0, 1) for n, v in rows.items()}
        if rows:
            apply_rows(dst.start * k, dst.stop * k, rows)
        if (piece["start"], piece["stop"]) == own and dst.start == 0:
            pfc.load_sampler_state(piece.get("sampler"))
    return opt_name


def merge_state_dicts(states: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Joins the per-rank states of one model into a single state with every piece.

    Raises:
        ValueError: the states disagree on C or D, or their class ranges overlap.
    """
    return merge_states(states)


def export_class_centers(pfc: PartialFC) -> torch.Tensor:
    """The full ``[C, D]`` class-centre matrix (un-normalised), gathered on every rank.

    ``[C, K, D]`` for a classifier with K > 1 sub-centres per class. fp32 for fp32/bf16/fp16
    storage, fp64 for fp64 weights.
    """
    rows = _per_class(pfc, pfc.weight.detach().to(master_dtype(pfc.weight.dtype)))
    return all_gather_no_grad(rows)


def checkpoint_class_centers(path: str | Path) -> tuple[torch.Tensor, dict[str, Any]]:
    """The full class-centre matrix of a training checkpoint, offline, and its main state.

    Reads every loss shard file the main checkpoint ``path`` names and joins their Partial FC
    pieces (any world size).

    Returns:
        ``([C, D] fp32 centres, or [C, K, D] with K sub-centres per class; the checkpoint's
        main state: backbone, config…)``; the centres are not normalised.

    Raises:
        FileNotFoundError / RuntimeError: a missing or unreadable checkpoint or shard (names it).
        ValueError: no loss shards, or pieces that are not a Partial FC state (names the file).
    """
    state = ckpt.load_checkpoint(path)
    parts = [shard.part("partial_fc").open() for shard in ckpt.load_shards(path, state)]
    if not parts:
        raise ValueError(f"{path}: checkpoint names no loss shards (key 'loss_shards')")
    merged = merge_states(parts)
    check_header(merged, FORMAT, merged["num_classes"], merged["embedding_size"], str(path))
    return full_rows(merged, "weight").float(), state
