"""torchrun for Slurm jobs: SIGTERM / SIGUSR1 go to the training processes, torchrun keeps running.

Plain torchrun answers SIGTERM by raising ``SignalException`` and shutting its workers down: it
signals them, waits a shutdown timeout, kills them, and exits with status 1. Under Slurm that
loses the checkpoint a preempted job promises, because ``scontrol requeue``, ``scancel``, a
preemption and the end of the time limit send SIGTERM to every process of the job at the same
moment (torchrun included), and the workers must be allowed to finish the step and write it.

Owns: running ``torch.distributed.run`` (same arguments) in this process with SIGTERM and SIGUSR1
taken out of torchrun's hands: the first of them is passed once to each of this process's
children (the workers torchrun started; they checkpoint and exit 0, see
``dist_train.train_step.install_stop_handlers``) as soon as the child has a handler for it (a
signal during start-up waits for the trainer instead of killing it), and torchrun goes on
supervising them, so it exits with their status. SIGINT / SIGHUP / SIGQUIT keep torchrun's
own handling. Linux only (children and their handlers are read from /proc).

    python launch/slurm/torchrun_forward.py --standalone --nproc_per_node=2 launch/train.py ...
"""

from __future__ import annotations

import contextlib
import os
import runpy
import signal
import sys
import threading
import time

_forwarded: set[int] = set()
_pending: list[int] = []
"""The stop signal received (at most one entry); the forwarding thread delivers it."""


def children(pid: int) -> list[int]:
    """Processes whose parent is ``pid`` (from /proc/<pid>/stat)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after ")".
        fields = stat[stat.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def catches(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler for ``signum`` (SigCgt in /proc/<pid>/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except OSError:
        pass
    return False


def _deliver() -> None:
    """Passes the stop signal to each worker once, as soon as the worker handles it: a signal
    that arrives before the workers exist, or before they have installed their handlers (it would
    kill them), waits for that instead of being lost."""
    signum = _pending[0]
    name = signal.Signals(signum).name
    while True:
        sent = []
        for pid in children(os.getpid()):
            if pid not in _forwarded and catches(pid, signum):
                _forwarded.add(pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)
                sent.append(pid)
        if sent:
            print(
                f"[torchrun_forward] {name} passed to the training processes {sent}; "
                "torchrun waits for them to checkpoint and exit",
                file=sys.stderr,
                flush=True,
            )
        time.sleep(0.2)


def _on_signal(signum: int, _frame) -> None:
    """The first SIGTERM/SIGUSR1 starts the forwarding; later ones are dropped (a second signal
    must not interrupt a checkpoint being written)."""
    if not _pending:
        _pending.append(signum)
        threading.Thread(target=_deliver, name="torchrun_forward", daemon=True).start()


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_signal)
    # torchrun must not install its own SIGTERM handler over ours (torch >= 2.8 reads this flag).
    sys.argv = ["torchrun", "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT", *sys.argv[1:]]
    # What "python -m torch.distributed.run" runs, in this process (the program, not an API).
    runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
