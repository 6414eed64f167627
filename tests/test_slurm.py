"""Tests of the SLURM launch scripts in ``launch/slurm/``, under a real one-node Slurm.

The session fixture ``slurm_cluster`` (tests/conftest.py, tests/slurm_cluster.py) starts munged,
slurmctld and slurmd on this machine; jobs are submitted with ``sbatch`` and signalled with
``scontrol requeue``, ``scancel`` and ``--signal=B:USR1@N`` as on a cluster. Each launch mode runs
with 2 CPU processes and a probe entry point that bootstraps, all-reduces, records what it saw
and waits for a stop signal; the real trainer runs through ``train_1node.sbatch`` on tiny
synthetic data. What one machine cannot show is several nodes (the multi-node script runs on one).
The fast tests check the shell library alone, with a recording ``scontrol`` stand-in where a job
record or a requeue call is needed, and the node-list parser against Slurm's expansion.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_train.distributed import expand_nodelist, first_host

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
LIB = SLURM_DIR / "lib.sh"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))
BATCH_SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))

FAKE_SCONTROL = r"""#!/bin/bash
# Fake scontrol: "-o show job ID" prints $FAKE_JOB (the job's record; nothing when unset);
# other calls are recorded, "show hostnames A,B" prints one name a line, "requeue" exits with
# $FAKE_REQUEUE_RC.
if [[ $1 == -o && $2 == show && $3 == job ]]; then
  [[ -z ${FAKE_JOB:-} ]] || echo "JobId=$4 $FAKE_JOB"
  exit 0
fi
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then
  tr ',' '\n' <<< "$3"
fi
[[ $1 != requeue ]] || exit "${FAKE_REQUEUE_RC:-0}"
"""

PROBE = """\
# Stand-in for launch/train.py: same arguments, real bootstrap and collective, no training.
import argparse, json, os, signal, sys, time
from pathlib import Path

sys.path.insert(0, {repo!r})
caught = []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, _f: caught.append(n))

import torch  # noqa: E402
from dist_train.distributed import all_reduce, cleanup, init_distributed  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--config", required=True)
p.add_argument("--set", action="append", default=[])
a = p.parse_args()
sets = dict(kv.split("=", 1) for kv in a.set)
out = Path(sets["output_dir"])
out.mkdir(parents=True, exist_ok=True)
info = init_distributed()
total = all_reduce(torch.tensor([float(info.rank + 1)]))
keys = ("SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS", "TORCHELASTIC_RUN_ID", "GROUP_RANK",
        "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT")
record = dict(rank=info.rank, local_rank=info.local_rank, world_size=info.world_size,
              total=total.item(), config=a.config, sets=sets, argv=sys.argv[1:],
              env={{k: os.environ.get(k) for k in keys}})
(out / f"rank{{info.rank}}.json").write_text(json.dumps(record))
if sets.get("probe.wait") == "1":
    (out / f"ready{{info.rank}}").touch()
    deadline = time.time() + 60
    while not caught and time.time() < deadline:
        time.sleep(0.05)
    (out / f"signal{{info.rank}}").write_text(str(caught[0]) if caught else "none")
cleanup()
"""


def _bash(snippet: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs ``snippet`` in bash after sourcing lib.sh; ``args`` become ``$1 ...``."""
    return subprocess.run(
        ["bash", "-c", f'source "{LIB}"; {snippet}', "bash", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )


def _clean_env() -> dict[str, str]:
    """This process's environment without launcher variables a test machine may carry."""
    drop = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GPUS", "CONFIG")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("SLURM_", "TORCHELASTIC_", "PET_"))
    }
    for k in ("OUTPUT_DIR", "RUN_NAME", "RUNS_DIR", "TRAIN_SCRIPT", "REPO_DIR", "RESUME"):
        env.pop(k, None)
    return env


# --- static checks ---------------------------------------------------------------------------
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
    res = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("script", BATCH_SCRIPTS, ids=lambda p: p.name)
def test_batch_scripts_ask_for_requeue_and_early_signal(script):
    lines = [ln.strip() for ln in script.read_text().splitlines() if ln.startswith("#SBATCH")]
    assert "#SBATCH --requeue" in lines
    assert any(ln.startswith("#SBATCH --signal=B:USR1@") for ln in lines)
    # A requeued job appends to its log instead of truncating it.
    assert "#SBATCH --open-mode=append" in lines


def test_there_are_three_launch_modes():
    assert {p.name for p in BATCH_SCRIPTS} >= {
        "train_1node.sbatch",
        "train_multinode.sbatch",
        "train_srun.sbatch",
    }


# --- host lists --------------------------------------------------------------------------------
HOST_LISTS = [
    ("node7", "node7"),
    ("gpu[03-05,07],cpu1", "gpu03"),
    ("gpu[07,03-05]", "gpu07"),
    ("cpu1,gpu[01-02]", "cpu1"),
    ("x[001]", "x001"),
    ("a[1-2]-ib[3-4]", "a1-ib3"),
    ("rack-2-node[10-12]", "rack-2-node10"),
    ("localhost", "localhost"),
    ("127.0.0.1", "127.0.0.1"),
]


@pytest.mark.parametrize("nodelist,first", HOST_LISTS)
def test_first_host_without_scontrol(nodelist, first):
    res = _bash('slurm_first_host_python "$1"', nodelist)
    assert res.returncode == 0, res.stderr
    assert res.stdout == first + "\n"


@pytest.mark.parametrize("nodelist,first", HOST_LISTS)
def test_first_host_agrees_with_the_python_bootstrap(nodelist, first):
    # srun mode: the batch script's MASTER_ADDR and the trainer's own fallback must agree.
    assert first_host(nodelist) == first


@pytest.mark.parametrize(
    "nodelist,hosts",
    [
        ("a[1-2]-ib[3-4]", ["a1-ib3", "a1-ib4", "a2-ib3", "a2-ib4"]),
        ("node[001-003,7]", ["node001", "node002", "node003", "node7"]),
        ("gpu-a[1,3]b", ["gpu-a1b", "gpu-a3b"]),
        ("gpu[09-11],cpu1 cpu2", ["gpu09", "gpu10", "gpu11", "cpu1", "cpu2"]),
    ],
)
def test_node_lists_expand_as_slurm_does(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["gpu[01-02", ",node1", "[]"])
def test_first_host_rejects_malformed_lists(bad):
    res = _bash('slurm_first_host_python "$1"', bad)
    assert res.returncode != 0
    assert "cannot parse the Slurm node list" in res.stderr and bad in res.stderr


@pytest.mark.parametrize("bad", ["gpu[01-02", ",node1", "[]", "a[3-1]", "a[x]", "a]", "a,,b"])
def test_parser_names_the_malformed_list_in_one_line(bad):
    with pytest.raises(ValueError, match="cannot parse the Slurm node list") as err:
        expand_nodelist(bad)
    assert repr(bad) in str(err.value) and "\n" not in str(err.value)


def test_first_host_prefers_scontrol_and_falls_back_without_it(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text("#!/bin/bash\nprintf 'n-from-scontrol\\nn2\\n'\n")
    fake.chmod(0o755)
    env = _clean_env() | {"SCONTROL": str(fake), "SLURM_JOB_NODELIST": "gpu[03-04]"}
    assert _bash("slurm_first_host", env=env).stdout == "n-from-scontrol\n"
    env["SCONTROL"] = str(tmp_path / "no-such-scontrol")
    assert _bash("slurm_first_host", env=env).stdout == "gpu03\n"
    del env["SLURM_JOB_NODELIST"]
    res = _bash("slurm_first_host", env=env)
    assert res.returncode == 2 and "SLURM_JOB_NODELIST" in res.stderr


def test_port_is_derived_from_the_job_id_unless_given():
    env = _clean_env() | {"SLURM_JOB_ID": "123456"}
    assert _bash("slurm_port", env=env).stdout == f"{20000 + 123456 % 20000}\n"
    assert _bash("slurm_port", env=env | {"MASTER_PORT": "4321"}).stdout == "4321\n"


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"GPUS": "3"}, "3"),
        ({"SLURM_GPUS_ON_NODE": "4"}, "4"),
        ({"SLURM_GPUS_PER_NODE": "a100:8"}, "8"),
        ({"SLURM_GPUS_PER_NODE": "gpu:h100:2"}, "2"),
    ],
)
def test_gpus_per_node(env, expected):
    res = _bash("slurm_gpus_per_node", env=_clean_env() | env)
    assert res.stdout == expected + "\n", res.stderr


def test_gpus_per_node_rejects_garbage():
    res = _bash("slurm_gpus_per_node", env=_clean_env() | {"GPUS": "four"})
    assert res.returncode == 2 and "GPUS" in res.stderr


# --- settings ----------------------------------------------------------------------------------
SHOW_SETUP = 'slurm_setup "$@"; printf "%s\\n" "$OUTPUT_DIR" "${TRAIN_ARGS[@]}"'


def test_setup_run_directory_follows_job_name_or_config(tmp_path):
    cfg = tmp_path / "r50_run.yaml"
    cfg.write_text("seed: 0\n")
    env = _clean_env() | {
        "REPO_DIR": str(REPO),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "RUNS_DIR": str(tmp_path / "r"),
        "SLURM_JOB_ID": "77",
        "SLURM_JOB_NAME": "train_1node.sbatch",
    }
    # Job named after the script (no -J): the config's stem names the run; a relative config path
    # is taken from the submission directory.
    res = _bash(SHOW_SETUP, "r50_run.yaml", "optim.lr=0.2", "data.root=/d", env=env)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == str(tmp_path / "r" / "r50_run")
    assert out[1:] == [
        "--config",
        str(cfg),
        "--set",
        f"output_dir={tmp_path / 'r' / 'r50_run'}",
        "--set",
        "checkpoint.resume=auto",
        "--set",
        "optim.lr=0.2",
        "--set",
        "data.root=/d",
    ]
    # -J myrun: the job name; never the job id (a requeued job keeps its name, not its output).
    res = _bash(SHOW_SETUP, "r50_run.yaml", env=env | {"SLURM_JOB_NAME": "myrun"})
    assert res.stdout.splitlines()[0] == str(tmp_path / "r" / "myrun")
    assert "77" not in res.stdout.splitlines()[0]
    # CONFIG from the environment, explicit OUTPUT_DIR and RESUME win.
    explicit = str(tmp_path / "explicit")
    res = _bash(SHOW_SETUP, env=env | {"CONFIG": str(cfg), "OUTPUT_DIR": explicit, "RESUME": ""})
    assert res.stdout.splitlines() == [
        explicit,
        "--config",
        str(cfg),
        "--set",
        f"output_dir={explicit}",
        "--set",
        "checkpoint.resume=",
    ]


def test_setup_errors_name_the_problem(tmp_path):
    env = _clean_env() | {
        "REPO_DIR": str(REPO),
        "SLURM_SUBMIT_DIR": str(tmp_path),
        "RUNS_DIR": str(tmp_path / "r"),
    }
    res = _bash(SHOW_SETUP, env=env)
    assert res.returncode == 2 and "no config" in res.stderr
    res = _bash(SHOW_SETUP, "missing.yaml", env=env)
    assert res.returncode == 2 and str(tmp_path / "missing.yaml") in res.stderr
    (tmp_path / "c.yaml").write_text("seed: 0\n")
    res = _bash(SHOW_SETUP, "c.yaml", "optim.lr", env=env)
    assert res.returncode == 2 and "'optim.lr' is not a config override" in res.stderr
    res = _bash(SHOW_SETUP, "c.yaml", env=env | {"TRAIN_SCRIPT": str(tmp_path / "nope.py")})
    assert res.returncode == 2 and "nope.py" in res.stderr


# --- forwarding and requeue without any Python ---------------------------------------------------
CHILD = r"""#!/bin/bash
# Pretend trainer: records the signal it gets, optionally "finishes" the run, exits cleanly.
name=$1
on_signal() {
  echo "$name got $1" >> "$CHILD_LOG"
  [[ -z ${FINISH:-} ]] || touch "$OUTPUT_DIR/model.pt"
  exit 0
}
trap 'on_signal TERM' TERM
trap 'on_signal USR1' USR1
touch "$READY"
for ((i = 0; i < 600; i++)); do sleep 0.05; done
echo "$name timed out" >> "$CHILD_LOG"
exit 3
"""


def _requeue_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    log = tmp_path / "slurm.log"
    scontrol = tmp_path / "scontrol"
    scontrol.write_text(FAKE_SCONTROL)
    scontrol.chmod(0o755)
    child = tmp_path / "child.sh"
    child.write_text(CHILD)
    (tmp_path / "out").mkdir(exist_ok=True)
    return (
        _clean_env()
        | {
            "SCONTROL": str(scontrol),
            "FAKE_SLURM_LOG": str(log),
            "OUTPUT_DIR": str(tmp_path / "out"),
            "CHILD_LOG": str(tmp_path / "child.log"),
            "READY": str(tmp_path / "ready"),
            "SLURM_JOB_ID": "4242",
        }
        | extra
    )


def _start_and_signal(tmp_path: Path, env: dict, snippet: str, sig: int) -> tuple[int, str]:
    proc = subprocess.Popen(
        ["bash", "-c", f'set -euo pipefail; source "{LIB}"; {snippet}'],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _wait_for([Path(env["READY"])], proc, 20)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=20)
    return proc.returncode, out


def _wait_for(paths: list[Path], proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.time() + timeout_s
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            out = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"exited with {proc.returncode} before {paths}:\n{out}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {paths}")
        time.sleep(0.05)


RUN_CHILD = 'slurm_run_and_requeue TERM bash "$(dirname "$READY")/child.sh" child'


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["USR1", "TERM"])
def test_signal_is_forwarded_once_then_the_job_is_requeued(tmp_path, sig):
    env = _requeue_env(tmp_path)
    rc, out = _start_and_signal(tmp_path, env, RUN_CHILD, sig)
    assert rc == 0, out
    assert (tmp_path / "child.log").read_text() == "child got TERM\n"
    assert (tmp_path / "slurm.log").read_text() == "scontrol requeue 4242\n"
    assert "requeued" in out


def test_no_requeue_when_the_run_finished_or_restarts_are_used_up(tmp_path):
    env = _requeue_env(tmp_path, FINISH="1")
    rc, out = _start_and_signal(tmp_path, env, RUN_CHILD, signal.SIGUSR1)
    assert rc == 0 and "had finished; not requeued" in out
    assert not (tmp_path / "slurm.log").exists()
    (tmp_path / "ready").unlink()
    env = _requeue_env(tmp_path, SLURM_RESTART_COUNT="5", MAX_REQUEUES="5")
    rc, out = _start_and_signal(tmp_path, env, RUN_CHILD, signal.SIGUSR1)
    assert "MAX_REQUEUES=5" in out and not (tmp_path / "slurm.log").exists()


def test_signal_during_setup_requeues_without_starting_the_training(tmp_path):
    env = _requeue_env(tmp_path)
    started = tmp_path / "started"
    res = subprocess.run(
        [
            "bash",
            "-c",
            f'set -euo pipefail; source "{LIB}"; kill -USR1 $$; '
            f'slurm_run_and_requeue TERM touch "{started}"',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert res.returncode == 0, res.stderr
    assert "before the training started" in res.stderr
    assert not started.exists()
    assert (tmp_path / "slurm.log").read_text() == "scontrol requeue 4242\n"


@pytest.mark.parametrize(
    "job,requeue_rc,calls,message,rc",
    [
        # scontrol requeue / preemption: Slurm already requeued the job (Restarts went up)
        ("JobState=COMPLETING Restarts=1", 0, "", "Slurm has requeued job 4242 itself", 0),
        # scancel, the hard time limit: Slurm ends the job and does not requeue it
        ("JobState=COMPLETING Restarts=0", 0, "", "Slurm is ending job 4242 (JobState=COMP", 0),
        # the early warning: the job still runs and requeues itself
        ("JobState=RUNNING Restarts=0", 0, "scontrol requeue 4242\n", "job 4242 requeued", 0),
        # a requeue the cluster refuses: a warning naming the state
        ("JobState=RUNNING Restarts=0", 1, "scontrol requeue 4242\n", "(JobState=RUNNING)", 0),
    ],
    ids=["requeued-by-slurm", "ended-by-slurm", "early-warning", "requeue-refused"],
)
def test_the_job_record_decides_about_the_requeue(tmp_path, job, requeue_rc, calls, message, rc):
    env = _requeue_env(tmp_path, FAKE_JOB=job, FAKE_REQUEUE_RC=str(requeue_rc))
    got_rc, out = _start_and_signal(tmp_path, env, RUN_CHILD, signal.SIGTERM)
    assert got_rc == rc, out
    assert message in out, out
    log = tmp_path / "slurm.log"
    assert (log.read_text() if log.exists() else "") == calls
    assert ("' failed" in out) == (requeue_rc != 0)


LATE_HANDLER = """\
import os, signal, sys, time
from pathlib import Path
out = Path(sys.argv[1])
time.sleep(3)  # start-up: no handler yet (a signal now would kill this process)
got = []
signal.signal(signal.SIGTERM, lambda n, _f: got.append(n))
(out / f"ready{os.environ['LOCAL_RANK']}").touch()
deadline = time.time() + 30
while not got and time.time() < deadline:
    time.sleep(0.05)
(out / f"got{os.environ['LOCAL_RANK']}").write_text(str(got))
"""


@pytest.mark.slow
def test_torchrun_forward_passes_an_early_signal_once_the_workers_handle_it(tmp_path):
    """SIGTERM to torchrun_forward.py before its workers exist (Slurm may send the early warning
    at once) reaches each worker once the worker handles it; torchrun exits with their 0."""
    script = tmp_path / "late.py"
    script.write_text(LATE_HANDLER)
    proc = subprocess.Popen(
        [sys.executable, str(SLURM_DIR / "torchrun_forward.py"), "--standalone"]
        + ["--nproc_per_node=2", str(script), str(tmp_path)],
        env=_clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
        _kill_leftovers(str(script))
    assert proc.returncode == 0, out
    assert [(tmp_path / f"got{r}").read_text() for r in range(2)] == [
        f"[{int(signal.SIGTERM)}]"
    ] * 2
    assert out.count("SIGTERM passed to the training processes") >= 1


def test_loader_workers_ignore_slurms_stop_signals():
    """Slurm signals every process of a job; a loader worker must survive SIGTERM/SIGUSR1 (the
    trainer process decides about the stop), or the step fails instead of checkpointing."""
    from torch.utils.data import DataLoader

    from dist_train.data.loader import worker_init

    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 100

        def __getitem__(self, i):
            return os.getpid()

    loader = DataLoader(
        Pids(),
        num_workers=1,
        worker_init_fn=worker_init,
        multiprocessing_context="fork",
        persistent_workers=True,
    )
    it = iter(loader)
    pid = int(next(it))
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        os.kill(pid, sig)
        time.sleep(0.5)
        assert int(next(it)) == pid
    del it, loader


def test_exit_status_passes_through_without_a_signal(tmp_path):
    env = _requeue_env(tmp_path)
    res = subprocess.run(
        ["bash", "-c", f'source "{LIB}"; slurm_run_and_requeue TERM bash -c "exit 7"'],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert res.returncode == 7 and "exited with status 7" in res.stderr
    assert not (tmp_path / "slurm.log").exists()


# --- the three launch modes on the real cluster, with a probe instead of the trainer ---------
def _probe_job(
    cluster, tmp_path: Path, script: str, *sbatch_opts: str, wait: str = "1", **env_extra: str
):
    """Submits ``script`` with the probe as entry point (``wait``: whether the probe waits for
    a stop signal); returns (job id, run dir, output file, config)."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO)))
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("seed: 0\n")
    out = tmp_path / "job.out"
    env = _clean_env() | {
        "SLURM_CONF": str(cluster.conf),
        "RUNS_DIR": str(tmp_path / "runs"),
        "PYTHON": sys.executable,
        "PYTHONPATH": str(REPO),
        "TRAIN_SCRIPT": str(probe),
        **env_extra,
    }
    env.pop("OMP_NUM_THREADS", None)  # the scripts derive it from the task's CPUs
    res = subprocess.run(
        ["sbatch", "--parsable", "-J", "probe", "--gpus-per-node=0", f"--output={out}"]
        + [*sbatch_opts, str(SLURM_DIR / script), str(cfg), f"probe.wait={wait}", "probe.tag=a b"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout.strip().split(";")[0], tmp_path / "runs" / "probe", out, cfg


def _preempt_probe(cluster, job: str, run: Path, out: Path) -> tuple[list[dict], list[str], str]:
    """Waits for both ranks, sends USR1 to the batch shell alone (what --signal=B:USR1@N does
    near the time limit), waits until the job has requeued itself."""
    try:
        deadline = time.monotonic() + 60
        while not all((run / f"ready{r}").exists() for r in range(2)):
            state = cluster.job(job).get("JobState")
            text = out.read_text() if out.exists() else ""
            assert state in ("PENDING", "RUNNING"), f"job {job} {state}:\n{text}"
            assert time.monotonic() < deadline, f"ranks not ready:\n{text}"
            time.sleep(0.2)
        cluster.run("scancel", "--signal=USR1", "--batch", job)
        info = cluster.wait_state(job, {"PENDING"}, 60)  # requeued by the script
        text = out.read_text()
        assert info["Restarts"] == "1", text
        assert f"job {job} requeued; it resumes" in text
        got = [(run / f"signal{r}").read_text() for r in range(2)]
        return _ranks(run), got, text
    finally:
        cluster.run("scancel", job, check=False)
        _kill_leftovers(str(run))


def _ranks(run: Path, n: int = 2) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(n)]


def _check_common(ranks: list[dict], cfg: Path, run: Path) -> None:
    for r, rec in enumerate(ranks):
        assert (rec["rank"], rec["world_size"], rec["total"]) == (r, 2, 3.0)
        assert rec["local_rank"] == r
        assert rec["config"] == str(cfg)
        assert rec["sets"]["output_dir"] == str(run)
        assert rec["sets"]["checkpoint.resume"] == "auto"
        assert rec["sets"]["probe.tag"] == "a b"  # an override with a space survives quoting
        assert rec["env"]["OMP_NUM_THREADS"] == "1"  # 2 CPUs shared by 2 processes


@pytest.mark.slow
def test_real_slurm_srun_per_task_mode_and_preemption(slurm_cluster, tmp_path):
    job, run, out, cfg = _probe_job(
        slurm_cluster, tmp_path, "train_srun.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1"
    )
    ranks, got, text = _preempt_probe(slurm_cluster, job, run, out)
    _check_common(ranks, cfg, run)
    for r, rec in enumerate(ranks):
        # The bootstrap read srun's variables; the batch script set the master.
        assert rec["env"]["SLURM_PROCID"] == str(r) and rec["env"]["SLURM_NTASKS"] == "2"
        assert rec["env"]["MASTER_ADDR"] == slurm_cluster.node  # scontrol expanded the list
        assert rec["env"]["MASTER_PORT"] == str(20000 + int(job) % 20000)
        assert rec["env"]["TORCHELASTIC_RUN_ID"] is None
    assert got == [str(int(signal.SIGUSR1))] * 2  # srun passed USR1 to every task


@pytest.mark.slow
def test_real_slurm_one_node_torchrun_mode_and_preemption(slurm_cluster, tmp_path):
    job, run, out, cfg = _probe_job(
        slurm_cluster, tmp_path, "train_1node.sbatch", "--cpus-per-task=2", CPU_PROCS="2"
    )
    ranks, got, text = _preempt_probe(slurm_cluster, job, run, out)
    _check_common(ranks, cfg, run)
    assert "torchrun_forward.py --standalone --nproc_per_node=2" in text
    for rec in ranks:
        assert rec["env"]["TORCHELASTIC_RUN_ID"] is not None  # torchrun started the workers
    assert got == [str(int(signal.SIGTERM))] * 2  # torchrun_forward passed the shell's TERM on


@pytest.mark.slow
def test_real_slurm_multinode_torchrun_mode_and_preemption(slurm_cluster, tmp_path):
    job, run, out, cfg = _probe_job(
        slurm_cluster,
        tmp_path,
        "train_multinode.sbatch",
        "--nodes=1",
        "--cpus-per-task=2",
        CPU_PROCS="2",
        MAX_RESTARTS="1",
    )
    ranks, got, text = _preempt_probe(slurm_cluster, job, run, out)
    _check_common(ranks, cfg, run)
    for rec in ranks:
        assert rec["env"]["TORCHELASTIC_RUN_ID"] == job  # --rdzv_id=$SLURM_JOB_ID
        assert rec["env"]["GROUP_RANK"] == "0"
    # srun got USR1 and Slurm signals every process of the step with it (relay.sh, torchrun,
    # the workers); relay.sh also turns it into TERM for torchrun_forward, which passes that on:
    # whichever comes first stops each worker.
    assert set(got) <= {str(int(signal.SIGUSR1)), str(int(signal.SIGTERM))}, got
    running = next(x for x in text.splitlines() if "running: " in x)
    port = 20000 + int(job) % 20000
    for part in (
        "relay.sh",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint={slurm_cluster.node}:{port}",
        f"--rdzv_id={job}",
        "--max-restarts=1",
    ):
        assert part in running


MODE_OPTS = {
    "train_srun.sbatch": (("--ntasks-per-node=2", "--cpus-per-task=1"), {}),
    "train_1node.sbatch": (("--cpus-per-task=2",), {"CPU_PROCS": "2"}),
    "train_multinode.sbatch": (
        ("--nodes=1", "--cpus-per-task=2"),
        {"CPU_PROCS": "2", "MAX_RESTARTS": "1"},
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(MODE_OPTS))
def test_real_slurm_modes_run_to_completion_without_requeue(slurm_cluster, tmp_path, script):
    opts, env = MODE_OPTS[script]
    job, run, out, cfg = _probe_job(slurm_cluster, tmp_path, script, *opts, wait="0", **env)
    try:
        info = slurm_cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, 60)
    finally:
        slurm_cluster.run("scancel", job, check=False)
        _kill_leftovers(str(run))
    text = out.read_text()
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "0"), text
    assert "training exited with status 0" in text and "requeue" not in text
    _check_common(_ranks(run), cfg, run)


def _pids_with(marker: str) -> list[int]:
    """Processes (other than this one) with ``marker`` in their command line."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(proc.name))
    return pids


def _kill_leftovers(marker: str) -> None:
    """Kills processes of a failed test that are still alive (torchrun starts its workers in
    sessions of their own). They are recognised by the test's run directory in their command
    line."""
    for pid in _pids_with(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


# --- a real one-node Slurm ---------------------------------------------------------------------
# munged, slurmctld and slurmd run on this machine (the session fixture ``slurm_cluster``); the
# one-node script runs launch/train.py with 2 CPU processes (CPU_PROCS=2) on tiny synthetic data.
# A requeued job starts again once its job credential has expired (``cred_expire``: 10 s in the
# test cluster, 120 s by default).
TINY_REAL = """\
seed: 0
max_steps: {max_steps}
log_every_steps: 1
data: {{root: {data}, batch_size: {batch}, num_workers: {workers}, image_size: 32}}
backbone: {{name: mobilefacenet, embedding_size: 32, params: {{input_size: [32, 32]}}}}
head: {{name: arcface}}
eval: {{targets: [], at_start: false, every_epoch: false}}
checkpoint: {{every_steps: 100000, at_epoch_end: false, keep_last: 2}}
"""


@pytest.fixture(scope="module")
def real_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("slurm_data") / "data"
    made = subprocess.run(
        [sys.executable, str(REPO / "launch" / "make_synthetic.py"), "--out", str(out)]
        + "--identities 16 --images-per-identity 8 --val-identities 4 --val-pairs 8".split()
        + "--image-size 32 --workers 1 --quiet".split(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    return out


class RealJob:
    """One training job on the real cluster (train_1node.sbatch unless ``SCRIPT`` is among the
    sbatch options as ``script=NAME``): submission, waiting, cleanup."""

    def __init__(
        self,
        cluster,
        tmp_path: Path,
        data: Path,
        max_steps: int,
        batch: int,
        workers: int,
        *sbatch_opts: str,
    ):
        self.cluster = cluster
        script = next(
            (o.split("=", 1)[1] for o in sbatch_opts if o.startswith("script=")),
            "train_1node.sbatch",
        )
        self.run = tmp_path / "runs" / "tiny"
        self.out = tmp_path / "job.out"
        cfg = tmp_path / "tiny.yaml"
        cfg.write_text(
            TINY_REAL.format(max_steps=max_steps, data=data, batch=batch, workers=workers)
        )
        env = _clean_env() | {
            "SLURM_CONF": str(cluster.conf),
            "CPU_PROCS": "2",
            "RUNS_DIR": str(tmp_path / "runs"),
            "PYTHON": sys.executable,
            "PYTHONPATH": str(REPO),
        }
        env.pop("OMP_NUM_THREADS", None)  # the script derives it: 2 CPUs / 2 processes
        res = subprocess.run(
            ["sbatch", "--parsable", "-J", "tiny", "--gpus-per-node=0", "--cpus-per-task=2"]
            + [f"--output={self.out}", *(o for o in sbatch_opts if not o.startswith("script="))]
            + [str(SLURM_DIR / script), str(cfg)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 0, res.stderr
        self.id = res.stdout.strip().split(";")[0]

    def text(self) -> str:
        return self.out.read_text() if self.out.exists() else ""

    def log(self) -> str:
        log = self.run / "train.log"
        return log.read_text() if log.exists() else ""

    def wait_for(self, what: str, timeout_s: float, where: str = "out") -> str:
        """Waits until the job output (or train.log) contains ``what``; returns that text."""
        deadline = time.monotonic() + timeout_s
        while True:
            text = self.text() if where == "out" else self.log()
            if what in text:
                return text
            info = self.cluster.job(self.id)
            state = info.get("JobState")
            assert state not in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), (
                f"job {self.id} {state} before '{what}': {info}\n{self.text()[-3000:]}"
            )
            assert time.monotonic() < deadline, f"no '{what}' after {timeout_s} s:\n{self.text()}"
            time.sleep(0.3)

    def state(self, states: set[str], timeout_s: float) -> dict[str, str]:
        try:
            return self.cluster.wait_state(self.id, states, timeout_s)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.text()[-3000:]}") from None

    def requeued(self) -> None:
        """Waits until the job is back in the queue (it starts again by itself)."""
        self.state({"PENDING", "RUNNING"}, 60)
        assert self.cluster.job(self.id)["Restarts"] == "1"

    def close(self) -> None:
        """Cancels the job if it still runs and waits until it and its processes are gone."""
        if self.cluster.job(self.id).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
            self.cluster.run("scancel", "--signal=KILL", "--full", self.id, check=False)
            self.cluster.run("scancel", self.id, check=False)
        with contextlib.suppress(AssertionError):
            self.cluster.wait_state(self.id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 30)
        _kill_leftovers(f"{self.run}")

    def signal_checkpoint(self, text: str) -> Path:
        """The checkpoint the batch script reports as written at the signal."""
        line = next(x for x in text.splitlines() if "checkpoint written at the signal: " in x)
        ckpt = Path(line.split("checkpoint written at the signal: ", 1)[1].strip())
        assert ckpt.exists() and ckpt.parent == self.run / "checkpoints", line
        return ckpt


@pytest.fixture
def real_job(slurm_cluster, real_data, tmp_path):
    jobs = []

    def submit(max_steps: int, *sbatch_opts: str, batch: int = 8, workers: int = 0) -> RealJob:
        jobs.append(
            RealJob(slurm_cluster, tmp_path, real_data, max_steps, batch, workers, *sbatch_opts)
        )
        return jobs[-1]

    yield submit
    for job in jobs:
        job.close()


def _step_of(ckpt: Path) -> int:
    return int(ckpt.stem.split("_")[1])


@pytest.mark.slow
def test_real_slurm_one_node_cpu_job_trains_and_finishes(real_job):
    job = real_job(4)
    info = job.state({"COMPLETED", "FAILED", "CANCELLED"}, 90)
    text = job.text()
    assert info["JobState"] == "COMPLETED", text
    assert "CPU_PROCS=2: 2 CPU processes per node, GPUs hidden" in text
    assert "training exited with status 0" in text
    assert "world size 2" in job.log()
    assert (job.run / "model.pt").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "opts",
    [(), ("script=train_srun.sbatch", "--ntasks-per-node=2", "--cpus-per-task=1")],
    ids=["torchrun", "srun"],
)
def test_real_slurm_scontrol_requeue_checkpoints_at_the_signal_and_resumes(real_job, opts):
    """``scontrol requeue`` signals every process of the job: the workers checkpoint at that
    step, the script says Slurm requeued the job (no requeue of its own, no warning), and the
    requeued job resumes from that checkpoint and finishes."""
    # Larger steps and a loader process per rank, as in the demo config: Slurm signals those too.
    job = real_job(10, *opts, batch=64, workers=1)
    job.wait_for("step 1/", 60, where="log")
    job.cluster.run("scontrol", "requeue", job.id)
    text = job.wait_for(f"Slurm has requeued job {job.id} itself (restart 1", 60)
    ckpt = job.signal_checkpoint(text)
    step = _step_of(ckpt)
    assert 1 <= step < 10
    # Slurm's SIGTERM, or the SIGUSR1 the batch shell sends srun, whichever came first
    assert re.search(rf"stopped by signal (10|15) at step {step}\b", job.log()), job.log()
    assert "failed" not in text and "warning" not in text, text
    # torchrun let the workers finish (plain torchrun raises SignalException and exits with 1)
    assert "training processes exited with status 0 after SIGTERM" in text
    assert "SignalException" not in text
    job.requeued()
    info = job.state({"COMPLETED", "FAILED", "CANCELLED"}, 90)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", job.text()
    assert f"resumed from {ckpt} at step {step}" in job.log()
    assert (job.run / "model.pt").exists()


@pytest.mark.slow
def test_real_slurm_time_limit_signal_checkpoints_and_the_job_requeues_itself(real_job):
    """``--signal=B:USR1@50`` with a 1-minute limit: the batch shell gets USR1 while the job
    runs, passes it on, the workers checkpoint, the script requeues the job, and the requeued
    job resumes from that checkpoint."""
    job = real_job(100000, "--time=1", "--signal=B:USR1@50")
    text = job.wait_for(f"job {job.id} requeued; it resumes", 85)
    assert "got SIGUSR1" in text
    ckpt = job.signal_checkpoint(text)
    assert f"stopped by signal {int(signal.SIGTERM)} at step {_step_of(ckpt)}" in job.log()
    job.requeued()
    job.wait_for(f"resumed from {ckpt} at step {_step_of(ckpt)}", 60, where="log")


@pytest.mark.slow
def test_real_slurm_scancel_checkpoints_and_stops_without_requeue(real_job):
    job = real_job(100000, workers=1)
    job.wait_for("step 3/", 60, where="log")
    job.cluster.run("scancel", job.id)
    info = job.state({"CANCELLED"}, 60)
    text = job.wait_for("without requeueing it", 30)
    assert info["Restarts"] == "0"
    ckpt = job.signal_checkpoint(text)
    assert f"stopped by signal {int(signal.SIGTERM)} at step {_step_of(ckpt)}" in job.log()
    assert f"Slurm is ending job {job.id}" in text and "requeued" not in text, text
    assert "training processes exited with status 0 after SIGTERM" in text
    deadline = time.monotonic() + 20  # nothing of the job is left running
    while _pids_with(str(job.run)):
        assert time.monotonic() < deadline, _pids_with(str(job.run))
        time.sleep(0.3)
