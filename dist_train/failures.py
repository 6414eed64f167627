"""How a process of the job ends when it fails.

Owns :func:`run_guarded` and :func:`exit_process`, which wrap an entry point's work: the
success path tears the process group down with a barrier
(:func:`~dist_train.distributed.cleanup`); on an exception the rank reports the error once,
tears the process group down *without* a collective (:func:`~dist_train.distributed.abort`)
and exits non-zero at once, so the launcher (torchrun, ``srun --kill-on-bad-exit``) stops the
other ranks instead of leaving them in a collective until the collective timeout.

What is reported:

* A user error (:data:`USER_ERRORS`: a config value, unusable data, a damaged record, a missing
  input file) is one line without a traceback, exit status 2. Its message already names the
  key, file, record or byte offset. A message every rank sees (the same config) is printed
  once: by the first rank to claim it in the process group's store, or by rank 0 when the
  error comes before the process group exists.
* Any other exception is logged with its traceback, exit status 1 -- unless another rank
  failed first (it left a mark in the store): then this rank's error (typically gloo's
  "connection closed by peer") is a consequence, and the rank leaves quietly.

Exit order: a user error exits at once. A rank with any other error exits
:data:`PEER_GRACE_S` later (a reported one, or one that may follow from a peer that died without
a report, e.g. SIGKILLed), so that the launcher sees the first failure first and names it as
the root cause.

Errors raised in a DataLoader worker reach the trainer wrapped by torch (the worker's whole
traceback in the message, or a RuntimeError when the type cannot be rebuilt): the original
type's name and message are read back from that text.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import multiprocessing
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from typing import NoReturn

from core.errors import ConfigError
from dist_train import distributed

log = logging.getLogger(__name__)

USER_ERRORS: tuple[str, ...] = (
    "ConfigError",
    "DataConfigError",
    "DataError",
    "RecordIOError",
    "TargetError",
    "ModelLoadError",
    "FileNotFoundError",
)
"""Exception types (by class name, along the class hierarchy) reported as one line, exit 2."""

REPORT_GRACE_S = 5.0
"""Before the process group exists, ranks other than 0 wait this long before printing a
config error themselves (normally the launcher has ended them after rank 0 printed it)."""

PEER_GRACE_S = 1.0
"""How long a rank whose error may follow from another rank's failure waits before it exits
(torchrun checks its workers every 0.1 s by default)."""

_STORE_TIMEOUT = timedelta(seconds=5)
_FAILED_KEY = "dist_train/failed"
_WORKER_ERROR = re.compile(r"Caught (\w+) in DataLoader worker process \d+\.")


def run_guarded(work: Callable[[], object]) -> int:
    """Runs ``work()`` and returns the process's exit status (0, 1 or 2), as described above.

    ``work`` may create the process group (:func:`~dist_train.distributed.init_distributed`);
    it is torn down here in every case.
    """
    started = time.time()
    try:
        work()
        distributed.cleanup()
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure ends the rank the same way
        return _fail(exc, started)
    except BaseException:  # KeyboardInterrupt, SystemExit: no report, no collective
        distributed.abort()
        raise


def exit_process(code: int) -> NoReturn:
    """Ends the process with ``code``: normally for 0, at once for a failure.

    A failing rank skips the interpreter's shutdown (``os._exit``) after flushing the logs and
    stopping its own child processes (DataLoader workers): that shutdown took 2-3 s of native
    teardown here before the rank's sockets closed, and with NCCL it can hang. The launcher
    notices the exit at its next check (torchrun: every 0.1 s) and stops the other ranks.
    """
    if code == 0:
        sys.exit(0)
    logging.shutdown()  # flushes train.log
    # torch's DataLoader SIGCHLD handler would raise here when a killed worker's exit arrives
    with contextlib.suppress(ValueError, AttributeError):  # not the main thread / no POSIX
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        # SIGKILL: loader workers ignore SIGTERM (see ``data.loader.worker_init``), and a
        # forked worker holds this rank's inherited gloo sockets open, so the peers would not
        # see the connection close until the worker noticed its parent was gone.
        child.kill()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def user_error_message(exc: BaseException) -> str | None:
    """The one-line report of a user error, or None for an unexpected exception."""
    message = str(exc)
    wrapped = _WORKER_ERROR.match(message)
    if wrapped is not None:  # the worker's type name; the last line is "module.Type: message"
        kind = wrapped.group(1) if wrapped.group(1) in USER_ERRORS else None
        message = message.rstrip().splitlines()[-1].split(f"{kind}: ", 1)[-1]
    else:
        names = {cls.__name__ for cls in type(exc).__mro__}
        kind = next((n for n in USER_ERRORS if n in names), None)
    if kind is None:
        return None
    if isinstance(exc, OSError) and exc.filename is not None:
        message = f"{exc.filename}: {exc.strerror}"  # not "[Errno 2] ...: 'path'"
    if "ConfigError" in kind:
        return f"config error: {message}"
    return message


def _fail(exc: Exception, started: float) -> int:
    rank = distributed.get_rank() if distributed.is_initialized() else _launcher_rank()
    message = user_error_message(exc)
    store = _store()
    if message is not None:
        if store is None and isinstance(exc, ConfigError) and rank != 0:
            # Every rank read the same config; rank 0 reports it and the launcher ends this
            # rank meanwhile. Still here after the grace period: rank 0 did not see the error.
            time.sleep(REPORT_GRACE_S)
        if store is None or _claim(store, _message_key(message), started):
            _claim(store, _FAILED_KEY, started)
            _report(rank, message)
        distributed.abort()
        return 2
    if store is not None and not _claim(store, _FAILED_KEY, started):
        # another rank failed first and reported it; this error follows from that one
        _let_the_launcher_see_peers_exit()
        distributed.abort()
        return 1
    _report(rank, f"failed: {type(exc).__name__}: {exc}", exc)
    if distributed.get_world_size() > 1:
        # the error may follow from a peer that died without a report (SIGKILL, a segfault)
        _let_the_launcher_see_peers_exit()
    distributed.abort()
    return 1


def _let_the_launcher_see_peers_exit() -> None:
    """Stays alive :data:`PEER_GRACE_S` so that the launcher observes an earlier failure first
    (torchrun names the first exit it sees as the root cause; two exits in one check are
    ordered by local rank)."""
    for sig in (signal.SIGCHLD, signal.SIGTERM):
        # SIGCHLD: torch's DataLoader handler raises when the launcher kills a worker process.
        # SIGTERM: the launcher has seen a failure and stops the job; ending now is right.
        with contextlib.suppress(ValueError, AttributeError):  # not the main thread / no POSIX
            signal.signal(sig, signal.SIG_DFL)
    time.sleep(PEER_GRACE_S)


def _report(rank: int, message: str, exc: BaseException | None = None) -> None:
    """One line on the console (and rank 0's train.log once logging is set up)."""
    if any(getattr(h, "_dist_train", False) for h in logging.getLogger().handlers):
        log.error("%s", message, exc_info=exc)  # the format names the rank
        return
    print(f"rank {rank}: {message}", file=sys.stderr, flush=True)
    if exc is not None:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)


def _launcher_rank() -> int:
    return distributed.env_world_info()[0]


def _message_key(message: str) -> str:
    return "dist_train/error/" + hashlib.sha1(message.encode()).hexdigest()


def _store():
    """The process group's key-value store (None without a process group or when it cannot be
    reached: the torchrun agent hosts it and outlives the workers; under plain ``srun`` rank 0
    hosts it)."""
    if not distributed.is_initialized():
        return None
    try:
        store = distributed.default_store()
        store.set_timeout(_STORE_TIMEOUT)  # a failing rank never waits long on the store
        return store
    except Exception:  # noqa: BLE001 - without a store every rank reports its own error
        return None


def _claim(store, key: str, started: float) -> bool:
    """True when this process is the first of this run to set ``key`` (True without a store).

    The value is the claim's time: a claim older than this process's start was left by an
    earlier round of a restarted job that shares the store, and does not count.
    """
    if store is None:
        return True
    mine = f"{time.time():.6f}"
    try:
        got = store.compare_set(key, "", mine).decode()
        if got == mine:
            return True
        if float(got) < started:
            store.set(key, mine)
            return True
        return False
    except Exception:  # noqa: BLE001 - the store is gone with its host: report
        return True
