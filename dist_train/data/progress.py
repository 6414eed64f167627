"""A minimal text progress bar for the data tools (no tqdm dependency).

Owns: drawing ``label [#####.....] n/total rate ETA`` on stderr, at most a few times a second.
Does not own: logging of training progress (the trainer's log line does that).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Counts work items and redraws one status line.

    Args:
        total: number of items expected.
        unit: what is counted, shown after the rate.
        disable: draw nothing (counting still works).
        stream: where to draw (stderr by default).
    """

    def __init__(
        self,
        total: int,
        unit: str = "it",
        *,
        disable: bool = False,
        stream: TextIO | None = None,
        width: int = 30,
    ):
        self.total = max(int(total), 0)
        self.unit = unit
        self.disable = disable
        self.stream = stream or sys.stderr
        self.width = width
        self.n = 0
        self._start = time.perf_counter()
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        """Adds ``n`` finished items and redraws if enough time passed."""
        self.n += n
        now = time.perf_counter()
        # on a terminal redraw often; in a log file (CI) only every 25% to keep it short
        tty = getattr(self.stream, "isatty", lambda: False)()
        step = 0.2 if tty else 1e9
        quarter = self.total and self.n * 4 // self.total != (self.n - n) * 4 // self.total
        if not self.disable and (now - self._last > step or quarter):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        elapsed = max(now - self._start, 1e-9)
        rate = self.n / elapsed
        frac = min(self.n / self.total, 1.0) if self.total else 1.0
        filled = int(frac * self.width)
        eta = (self.total - self.n) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:5.0f}s" if eta != float("inf") else "    ?"
        line = (
            f"\r[{'#' * filled}{'.' * (self.width - filled)}] {self.n}/{self.total} "
            f"{rate:7.1f} {self.unit}/s ETA {eta_s}"
        )
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(line if tty else line[1:] + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Final line (always drawn unless disabled)."""
        if not self.disable:
            tty = getattr(self.stream, "isatty", lambda: False)()
            if tty:
                self._draw(time.perf_counter())
                self.stream.write("\n")
            elif self.n * 4 // max(self.total, 1) < 4:  # not yet printed at 100%
                self._draw(time.perf_counter())
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
