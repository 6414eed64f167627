"""Fault tolerance of real runs: the launcher ``launch/train.py`` in subprocesses, on CPU.

- a worker killed with SIGKILL under ``torchrun --max-restarts=1`` -> the elastic agent restarts
  both workers, they resume from the newest checkpoint (the default ``checkpoint.resume``) and
  the run completes;
- a second run into a finished run's directory stops before writing anything (``model.pt``,
  checkpoints and log unchanged); ``checkpoint.resume=never`` moves the finished run aside and
  starts fresh;
- SIGUSR1 to a single-process run and SIGTERM to the torchrun agent (2 workers) -> a checkpoint
  at the step where every rank agreed to stop, a clean exit, and a later ``resume=auto`` run
  continues from that step;
- a corrupt newest checkpoint is skipped with a warning by ``resume=auto``.

Exit status of torchrun after SIGTERM (pinned below): the agent forwards SIGTERM to its workers,
waits for them (up to 30 s before SIGKILL), and then exits with status 1 even though every worker
exited 0 (it re-raises the ``SignalException`` it got). Batch scripts must therefore decide
"preempted or failed" from the run directory (a checkpoint newer than the start), not from
torchrun's status. SIGUSR1 is not handled by torchrun at all (it would kill the agent before the
workers checkpoint), which is why ``launch/slurm/relay.sh`` turns USR1 into TERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A small real network; 96 images / (batch 8 x world) give 6 (2 processes) or 12 steps an epoch.
_NET = {
    "backbone.name": "mobilefacenet",
    "backbone.params": "{input_size: 32, width_mult: 0.5}",
    "eval.targets": "[]",
}


def _command(data: Path, run: Path, nproc: int, restarts: int = 0, **extra) -> list[str]:
    sets = tiny_overrides(data, run, **{**_NET, **extra})
    if nproc == 1:
        cmd = [sys.executable, str(REPO / "launch" / "train.py")]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}",
            "--monitor-interval=0.1",
            str(REPO / "launch" / "train.py"),
        ]
    cmd += ["--config", str(REPO / "launch" / "configs" / "demo.yaml")]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _start(cmd: list[str], log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(log_file, "w")  # a file, not a pipe: nobody reads while the run goes on
    return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def _wait_for(what: str, cond, proc: subprocess.Popen, log_file: Path, timeout: float = 120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = cond()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(
                f"run ended (rc {proc.returncode}) before {what}:\n" + log_file.read_text()[-4000:]
            )
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}:\n" + log_file.read_text()[-4000:])


def _finish(proc: subprocess.Popen, log_file: Path, timeout: float = 180) -> str:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail("run did not finish:\n" + log_file.read_text()[-4000:])
    return log_file.read_text()


def _children(pid: int) -> list[int]:
    """PIDs whose parent is ``pid`` (from /proc/<pid>/stat; field 4 is the parent PID)."""
    kids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command name (field 2) is in parentheses and may hold spaces
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            kids.append(int(entry.name))
    return kids


def _workers(agent: int) -> list[int]:
    """The training processes under a torchrun agent (identified by their command line)."""
    found = []
    for pid in _children(agent):
        try:
            cmdline = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"launch/train.py") for arg in cmdline):
            found.append(pid)
    return found


def _checkpoints(run: Path) -> list[int]:
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(
        int(m.group(1)) for p in folder.iterdir() if (m := re.match(r"^step_(\d+)\.pt$", p.name))
    )


def _logged_step(log_text: str) -> int:
    steps = re.findall(r" step (\d+)/\d+ epoch", log_text)
    return int(steps[-1]) if steps else 0


# ------------------------------------------------------------------------------------------


def test_sigkilled_worker_restarts_from_last_checkpoint(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "torchrun.out"
    total = 20
    proc = _start(
        _command(
            tiny_data,
            run,
            2,
            restarts=1,
            **{
                "max_steps": total,
                "checkpoint.every_steps": 3,
                "checkpoint.keep_last": 2,
                # checkpoint.resume left at its default: a restart resumes without flags
            },
        ),
        out,
    )
    _wait_for("a first checkpoint", lambda: _checkpoints(run), proc, out)
    workers = _wait_for(
        "2 workers", lambda: len(_workers(proc.pid)) == 2 and _workers(proc.pid), proc, out
    )
    victim = max(workers)  # one worker (the other is stopped and restarted by the agent)
    os.kill(victim, signal.SIGKILL)
    saved_before_kill = _checkpoints(run)[-1]
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert saved_before_kill < total, "the run was over before the kill"
    resumed = re.findall(r"resumed from \S+step_(\d+)\.pt at step (\d+)", text)
    assert len(resumed) == 1, text[-4000:]
    step = int(resumed[0][1])
    assert saved_before_kill <= step < total
    assert "(exitcode: -9)" in text  # the agent saw the SIGKILL
    assert (run / "model.pt").is_file()
    assert _checkpoints(run)[-1] == total
    assert _logged_step((run / "train.log").read_text()) == total


def test_sigusr1_checkpoints_and_a_resumed_run_continues(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "train.out"
    sets = {"max_steps": 200, "checkpoint.every_steps": 0}
    proc = _start(_command(tiny_data, run, 1, **sets), out)
    # a logged step means fit() is past its signal-handler installation
    _wait_for("step 2", lambda: _logged_step(out.read_text()) >= 2, proc, out)
    proc.send_signal(signal.SIGUSR1)
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    stopped = re.search(rf"stopped by signal {int(signal.SIGUSR1)} at step (\d+)", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert 2 <= step < 200 and _checkpoints(run) == [step]
    assert not (run / "model.pt").exists()  # preempted, not finished

    # the requeued job: same run directory, resume=auto, runs to the end
    total = step + 3
    proc = _start(
        _command(tiny_data, run, 1, **{**sets, "max_steps": total, "checkpoint.resume": "auto"}),
        out,
    )
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert re.search(rf"resumed from \S+step_{step:08d}\.pt at step {step} ", text), text[-4000:]
    assert re.findall(r" step (\d+)/\d+ epoch", text) == [
        str(s) for s in range(step + 1, total + 1)
    ]
    assert (run / "model.pt").is_file()


def test_sigterm_to_torchrun_checkpoints_every_rank_and_resumes(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "torchrun.out"
    sets = {"max_steps": 200, "checkpoint.every_steps": 0}
    proc = _start(_command(tiny_data, run, 2, **sets), out)
    _wait_for("step 2", lambda: _logged_step(out.read_text()) >= 2, proc, out)
    proc.send_signal(signal.SIGTERM)
    text = _finish(proc, out)
    # torchrun re-raises the signal as an error after its workers exited cleanly
    assert proc.returncode == 1, text[-4000:]
    stopped = re.search(rf"stopped by signal {int(signal.SIGTERM)} at step (\d+)", text)
    assert stopped, text[-4000:]
    step = int(stopped.group(1))
    assert _checkpoints(run) == [step]
    for rank in (0, 1):
        assert (run / "checkpoints" / f"step_{step:08d}.shard{rank:03d}-of-002.pt").is_file()
    assert "(exitcode: -9)" not in text  # nobody had to be killed

    total = step + 2
    proc = _start(
        _command(tiny_data, run, 2, **{**sets, "max_steps": total, "checkpoint.resume": "auto"}),
        out,
    )
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert re.search(rf"resumed from \S+step_{step:08d}\.pt at step {step} ", text), text[-4000:]
    assert (run / "model.pt").is_file() and _checkpoints(run)[-1] == total


def test_resume_auto_skips_a_corrupt_newest_checkpoint(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "train.out"
    sets = {"max_steps": 4, "checkpoint.every_steps": 2}
    proc = _start(_command(tiny_data, run, 1, **sets), out)
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert _checkpoints(run) == [2, 4]
    # the same run as a node failure leaves it: its config and checkpoints, not finished
    cut = tmp_path / "cut"
    shutil.copytree(run / "checkpoints", cut / "checkpoints")
    shutil.copy(run / "config.yaml", cut / "config.yaml")
    run = cut
    newest = run / "checkpoints" / "step_00000004.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a torn write from a dying node

    proc = _start(
        _command(tiny_data, run, 1, **{**sets, "max_steps": 5, "checkpoint.resume": "auto"}), out
    )
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert re.search(
        r"WARNING skipping checkpoint: checkpoint \S+step_00000004\.pt is corrupt", text
    ), text[-4000:]
    assert re.search(r"resumed from \S+step_00000002\.pt at step 2 ", text), text[-4000:]
    assert re.findall(r" step (\d+)/\d+ epoch", text) == ["3", "4", "5"]


def _snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def _finished_run(tiny_data: Path, run: Path, out: Path, **sets) -> dict[str, bytes]:
    """A finished 6-step single-process run in ``run``; its files' bytes."""
    proc = _start(_command(tiny_data, run, 1, **sets), out)
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    assert _checkpoints(run) == [3, 6] and (run / "model.pt").is_file()
    return _snapshot(run)


_SETS = {"max_steps": 6, "checkpoint.every_steps": 3, "checkpoint.keep_last": 2}


def test_a_second_run_into_a_finished_run_stops_and_keeps_its_model(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "torchrun.out"
    finished = _finished_run(tiny_data, run, out, **_SETS)
    # the second run: same output_dir, 4 steps, 2 processes
    proc = _start(_command(tiny_data, run, 2, **{**_SETS, "max_steps": 4}), out)
    text = _finish(proc, out)
    assert proc.returncode != 0, text[-4000:]
    assert f"{run} holds a finished run (model.pt); start this run in a new output_dir" in text
    assert "checkpoint.resume=never" in text
    assert "step 1/" not in text
    assert _snapshot(run) == finished  # model.pt, checkpoints, log: not a byte changed


def test_resume_never_moves_a_finished_run_aside_and_starts_fresh(tiny_data, tmp_path):
    run, out = tmp_path / "run", tmp_path / "train.out"
    finished = _finished_run(tiny_data, run, out, **_SETS)
    sets = {**_SETS, "max_steps": 4, "checkpoint.resume": "never"}
    proc = _start(_command(tiny_data, run, 1, **sets), out)
    text = _finish(proc, out)
    assert proc.returncode == 0, text[-4000:]
    (moved,) = run.glob("previous-*")
    assert f"the previous run's files are in {moved}" in text
    assert _snapshot(moved) == finished  # moved, not a byte changed
    assert "resumed from" not in text
    assert re.findall(r" step (\d+)/4 epoch", text) == ["1", "2", "3", "4"]
    assert _checkpoints(run) == [3, 4]  # only the new run's checkpoints
    assert (run / "model.pt").read_bytes() != finished["model.pt"]
