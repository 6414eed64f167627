"""Console and file logging for runs: only rank 0 writes, every rank can still warn.

Owns logger set-up, the ETA string and a TensorBoard writer that is a no-op off rank 0.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any


def setup_logging(run_dir: str | Path | None, is_main: bool, rank: int = 0) -> None:
    """Rank 0 logs INFO to the console and to ``run_dir/train.log``; other ranks WARNING only."""
    root = logging.getLogger()
    for h in list(root.handlers):  # only ours: a host (pytest, a notebook) keeps its own
        if getattr(h, "_dist_train", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter(
        f"%(asctime)s [rank{rank}] %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if is_main and run_dir is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(Path(run_dir) / "train.log"))
    for h in handlers:
        h.setFormatter(fmt)
        h._dist_train = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(logging.INFO if is_main else logging.WARNING)


def format_eta(seconds: float) -> str:
    """``1d02h03m`` / ``02h03m04s`` / ``03m04s``."""
    seconds = max(0, int(seconds))
    d, rem = divmod(seconds, 86400)
    h, rem = divmod(rem, 3600)
    m, s = divmod(rem, 60)
    if d:
        return f"{d}d{h:02d}h{m:02d}m"
    if h:
        return f"{h:02d}h{m:02d}m{s:02d}s"
    return f"{m:02d}m{s:02d}s"


class TensorBoard:
    """A SummaryWriter on rank 0 (when enabled); every method is a no-op elsewhere."""

    def __init__(self, log_dir: str | Path, enabled: bool) -> None:
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    def scalars(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.scalar(prefix + k, v, step)

    def hparams(self, hparams: dict[str, Any], metrics: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
