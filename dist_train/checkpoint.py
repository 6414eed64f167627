"""Training-state checkpoints: atomic writes, rotation, and finding the newest valid one.

Owns the file side only (where, how, which). What goes into a checkpoint, and when it is
written and restored, belongs to :mod:`dist_train.checkpointer`; the Partial FC part is
world-size-free (per-class rows tagged with class ranges), so a checkpoint written by N
processes loads into M processes.

Loss shard files: the main file names them (``loss_shards``) and records the class ranges of
each one's class-sharded parts (``loss_shard_ranges``, :func:`shard_ranges`), so that a rank
opens only the files that overlap its classes (:class:`ShardFile`), memory-mapped; checkpoints
without the ranges are read by opening every file for them.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from dist_train.sharded_state import StoredState, piece_ranges

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8,})\.pt$")


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    """``run_dir/checkpoints/step_XXXXXXXX.pt``."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def shard_path(main: str | Path, rank: int, world_size: int) -> Path:
    """``step_XXXXXXXX.shardRRR-of-WWW.pt`` beside the main checkpoint file."""
    main = Path(main)
    return main.with_name(f"{main.stem}.shard{rank:03d}-of-{world_size:03d}.pt")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Step checkpoints in ``run_dir/checkpoints``, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def rotate(run_dir: str | Path, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` step checkpoints (``keep_last <= 0`` keeps all)."""
    if keep_last <= 0:
        return
    for old in list_checkpoints(run_dir)[:-keep_last]:
        # main file first: without it the shards are never picked up
        for p in [old, *old.parent.glob(f"{old.stem}.shard*.pt")]:
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a checkpoint onto the CPU; a missing or unreadable file raises naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling/zip error means a corrupt file
        raise RuntimeError(f"checkpoint {path} is corrupt or unreadable: {exc}") from exc
    if not isinstance(state, dict) or "step" not in state:
        raise RuntimeError(f"checkpoint {path} is not a training checkpoint (no 'step' key)")
    for name in state.get("loss_shards", []):
        shard = path.with_name(name)
        if not shard.is_file() or shard.stat().st_size == 0:
            raise RuntimeError(f"checkpoint {path}: its shard {shard} is missing or empty")
    return state


def shard_ranges(local: dict[str, Any]) -> dict[str, list[list[int]]]:
    """The class ranges of each class-sharded part of a rank's loss state (for the main file).

    ``{"partial_fc": [[start, stop]], "center": [[start, stop]]}``: one range per piece.
    """
    return {
        part: [[a, b] for a, b in piece_ranges(value)]
        for part, value in local.items()
        if isinstance(value, dict) and "pieces" in value
    }


class ShardFile:
    """A loss shard file that a main checkpoint names, opened memory-mapped only on demand.

    Args:
        path: the file.
        ranges: its parts' class ranges as the main file records them (:func:`shard_ranges`),
            or ``None`` for a checkpoint without them.

    Attributes:
        opened: whether the file has been opened.
    """

    def __init__(self, path: Path, ranges: dict[str, Any] | None) -> None:
        self.path = path
        self.ranges = ranges
        self.opened = False

    def open(self) -> dict[str, Any]:
        """The file's content, tensors memory-mapped (their pages are read when touched)."""
        try:
            content = torch.load(self.path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unpickling/zip error means a corrupt file
            raise RuntimeError(
                f"checkpoint shard {self.path} is corrupt or unreadable: {exc}"
            ) from exc
        self.opened = True
        return content

    def part(self, name: str) -> StoredState:
        """The class-sharded state ``name`` (``"partial_fc"``, ``"center"``) in the file."""

        def open_part() -> dict[str, Any]:
            content = self.open()
            if name not in content:
                raise RuntimeError(f"checkpoint shard {self.path} has no {name!r} state")
            return content[name]

        recorded = None if self.ranges is None else self.ranges.get(name)
        return StoredState(open_part, recorded, name=f"checkpoint shard {self.path} [{name}]")

    def __repr__(self) -> str:
        return f"ShardFile({self.path})"


def load_shards(path: str | Path, state: dict[str, Any]) -> list[ShardFile]:
    """The loss shard files that the main checkpoint ``path`` names, in rank order, unopened."""
    path = Path(path)
    names = state.get("loss_shards", [])
    ranges = state.get("loss_shard_ranges")
    if ranges is not None and len(ranges) != len(names):
        raise RuntimeError(
            f"checkpoint {path}: key 'loss_shard_ranges' has {len(ranges)} entries for "
            f"{len(names)} loss shards"
        )
    return [
        ShardFile(path.with_name(name), None if ranges is None else ranges[i])
        for i, name in enumerate(names)
    ]


def find_resume(run_dir: str | Path, resume: str) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from, or ``None`` for a fresh run.

    Args:
        run_dir: the run directory.
        resume: ``""`` (fresh), ``"auto"`` (newest checkpoint that loads; corrupt ones are skipped
            with a warning) or a file path (must load).
    """
    if not resume:
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except RuntimeError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None
