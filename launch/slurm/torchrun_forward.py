"""torchrun for Slurm jobs: SIGTERM / SIGUSR1 go to the training processes, torchrun keeps running.

Plain torchrun answers SIGTERM by raising ``SignalException`` and shutting its workers down: it
signals them, waits a shutdown timeout, kills them, and exits with status 1. Under Slurm that
loses the checkpoint a preempted job promises, because ``scontrol requeue``, ``scancel``, a
preemption and the end of the time limit send SIGTERM to every process of the job at the same
moment (torchrun included), and the workers must be allowed to finish the step and write it.

Owns: running ``torch.distributed.run`` (same arguments) in this process with SIGTERM and SIGUSR1
taken out of torchrun's hands: the first of them is passed once to each of this process's
children (the workers torchrun started; they checkpoint and exit 0, see
``dist_train.train_step.install_stop_handlers``), and torchrun goes on supervising them, so it
exits with their status. SIGINT / SIGHUP / SIGQUIT keep torchrun's own handling. Linux only
(children are found in /proc).

    python launch/slurm/torchrun_forward.py --standalone --nproc_per_node=2 launch/train.py ...
"""

from __future__ import annotations

import os
import signal
import sys

_forwarded: set[int] = set()


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


def _forward(signum: int, _frame) -> None:
    """Passes the first SIGTERM/SIGUSR1 to the workers, once each; later ones are dropped (a
    second signal must not interrupt a checkpoint being written)."""
    if _forwarded:
        return
    for pid in children(os.getpid()):
        _forwarded.add(pid)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
    name = signal.Signals(signum).name
    print(
        f"[torchrun_forward] {name}: passed to the training processes {sorted(_forwarded)}; "
        "waiting for them to checkpoint and exit",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _forward)
    # torchrun must not install its own SIGTERM handler over ours (torch >= 2.8 reads this flag).
    sys.argv = [
        "torchrun",
        "--signals-to-handle=SIGINT,SIGHUP,SIGQUIT",
        *sys.argv[1:],
    ]
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
