"""Training-state checkpoints: atomic writes, rotation, and finding the newest valid one.

Owns the file side only (where, how, which) and the run directory's files as a whole: which
entries make up a run (:data:`RUN_ENTRIES`), whether it finished, moving a run aside. What goes
into a checkpoint, and when it is written and restored, belongs to
:mod:`dist_train.checkpointer`, and so does deciding whether a start may use a run directory;
the Partial FC part is world-size-free (per-class rows tagged with class ranges), so a
checkpoint written by N processes loads into M processes.

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
import time
from pathlib import Path
from typing import Any

import torch

from dist_train.sharded_state import StoredState, piece_ranges

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8,})\.pt$")

# What a run writes into its directory (glob patterns). Anything else there is not the run's and
# is never moved. A component that writes a new kind of file into the run directory adds it here.
RUN_ENTRIES = (
    "config.yaml",
    "train.log",
    "checkpoints",
    "tensorboard",
    "model.pt",
    "best_model.pt",
    "best_model.json",
    "metrics*.json",
)
# Written at the end of a run only: their presence means the run finished.
FINISHED_MARKERS = ("model.pt", "metrics.json")


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


def step_of(path: str | Path) -> int:
    """The step in a checkpoint's file name (``step_00000042.pt`` -> 42)."""
    m = _NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not named step_XXXXXXXX.pt")
    return int(m.group(1))


def rotate(run_dir: str | Path, keep_last: int, written: str | Path | None = None) -> None:
    """Keeps the newest ``keep_last`` step checkpoints, deletes the others (``<= 0`` keeps all).

    Args:
        run_dir: the run directory.
        keep_last: how many to keep.
        written: the checkpoint just written. It is always kept, and counts as the newest:
            the others kept are the ``keep_last - 1`` newest before it. Checkpoints of later
            steps (a timeline this run left by resuming from an older checkpoint) are deleted,
            so that ``resume=auto`` can never jump back onto them.
    """
    if keep_last <= 0:
        return
    found = list_checkpoints(run_dir)
    if written is None:
        doomed = found[:-keep_last]
    else:
        written = Path(written)
        before = [p for p in found if step_of(p) < step_of(written)]
        kept = {written.name, *(p.name for p in before[max(0, len(before) - keep_last + 1) :])}
        doomed = [p for p in found if p.name not in kept]
    for old in doomed:
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
        resume: ``"auto"`` (newest checkpoint that loads; corrupt ones are skipped with a
            warning), ``"never"`` or ``""`` (fresh) or a file path (must load). Whether the run
            directory may be used at all is decided before (:func:`dist_train.checkpointer.
            claim_run_dir`).
    """
    if resume in ("", "never"):
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint(resume)
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except RuntimeError as exc:
            log.warning("skipping checkpoint: %s", exc)
    return None


def run_entries(run_dir: str | Path) -> list[Path]:
    """The entries of :data:`RUN_ENTRIES` present in ``run_dir`` (empty: no run there)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted({p for pattern in RUN_ENTRIES for p in run_dir.glob(pattern)})


def finished_marker(run_dir: str | Path) -> Path | None:
    """``model.pt`` or ``metrics.json`` when the run in ``run_dir`` finished, else ``None``."""
    for name in FINISHED_MARKERS:
        if (Path(run_dir) / name).exists():
            return Path(run_dir) / name
    return None


def move_aside(run_dir: str | Path) -> Path:
    """Moves the run's entries (:data:`RUN_ENTRIES`) into ``run_dir/previous-<UTC time>/``.

    Nothing is deleted; other files in ``run_dir`` and earlier ``previous-*`` folders stay.
    Returns the folder the entries went to.
    """
    run_dir = Path(run_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = run_dir / f"previous-{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / f"previous-{stamp}-{n}"
    target.mkdir()
    for entry in run_entries(run_dir):
        os.replace(entry, target / entry.name)
    return target
