"""Tests of the SLURM launch scripts in ``launch/slurm/`` on one machine, with Slurm faked.

What is real: the sbatch scripts and their shell library run under bash exactly as sbatch would
run them, torchrun is the real ``torch.distributed.run``, and the processes join a real gloo
group through :func:`dist_train.distributed.init_distributed`. What is faked: ``srun`` (a shell
shim that starts its tasks locally with ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` set,
passes USR1/USR2 on and turns TERM into KILL as the real one does), ``scontrol`` (records its
calls), the allocation (``SLURM_JOB_NODELIST=localhost``, one node, 2 processes), and the
training entry point: a probe script that bootstraps, all-reduces, records what it saw and,
when asked, waits for a preemption signal. The real trainer runs through the one-node script in
the ``slow`` test at the end.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from dist_train.distributed import expand_nodelist, first_host, free_port

REPO = Path(__file__).resolve().parents[1]
SLURM_DIR = REPO / "launch" / "slurm"
LIB = SLURM_DIR / "lib.sh"
SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch")) + sorted(SLURM_DIR.glob("*.sh"))
BATCH_SCRIPTS = sorted(SLURM_DIR.glob("*.sbatch"))

FAKE_SRUN = r"""#!/bin/bash
# Fake srun: starts --ntasks copies of the command on this machine. Like the real srun it passes
# USR1/USR2 to its tasks and answers TERM by killing them.
ntasks=1
while [[ $# -gt 0 && $1 == -* ]]; do
  case $1 in
    --ntasks=*) ntasks=${1#*=} ;;
    -n) ntasks=$2; shift ;;
  esac
  shift
done
echo "srun ntasks=$ntasks $*" >> "$FAKE_SLURM_LOG"
pids=()
trap 'kill -USR1 "${pids[@]}" 2>/dev/null' USR1
trap 'kill -USR2 "${pids[@]}" 2>/dev/null' USR2
trap 'kill -KILL "${pids[@]}" 2>/dev/null' TERM
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks SLURM_STEP_ID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do
  while :; do
    wait "$p"; r=$?
    if ((r > 128)) && kill -0 "$p" 2>/dev/null; then continue; fi
    break
  done
  ((r > rc)) && rc=$r
done
exit $rc
"""

FAKE_SCONTROL = r"""#!/bin/bash
# Fake scontrol: records the call; "show hostnames A,B" prints one name a line.
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
if [[ $1 == show && $2 == hostnames ]]; then
  tr ',' '\n' <<< "$3"
fi
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


# --- the batch scripts with a faked allocation ---------------------------------------------------
@pytest.fixture
def fake_slurm(tmp_path):
    """Environment of a one-node, two-process allocation on localhost, and its files."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE.format(repo=str(REPO)))
    cfg = tmp_path / "probe.yaml"
    cfg.write_text("seed: 0\n")
    job_id = str(900000 + os.getpid() % 90000)
    env = _clean_env() | {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "probe",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_NNODES": "1",
        "SLURM_SUBMIT_DIR": str(REPO),
        "SLURM_CPUS_PER_TASK": "4",
        "RUNS_DIR": str(tmp_path / "runs"),
        "GPUS": "2",
        "MASTER_PORT": str(free_port()),
        "PYTHON": sys.executable,
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
        "SRUN": str(bin_dir / "srun"),
        "SCONTROL": str(bin_dir / "scontrol"),
        "TRAIN_SCRIPT": str(probe),
        "FAKE_SLURM_LOG": str(tmp_path / "slurm.log"),
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "20",
    }
    env.pop("OMP_NUM_THREADS", None)  # the scripts derive it from SLURM_CPUS_PER_TASK
    yield {
        "env": env,
        "cfg": cfg,
        "run": tmp_path / "runs" / "probe",
        "job": job_id,
        "log": tmp_path / "slurm.log",
    }
    _kill_leftovers(f"{tmp_path}/")


def _kill_leftovers(marker: str) -> None:
    """Kills processes this test started that are still alive after a failure (torchrun starts
    its workers in sessions of their own, so killing the batch shell's group would miss them).
    They are recognised by this test's temporary directory in their command line."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmdline:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                pass


def _ranks(run: Path, n: int = 2) -> list[dict]:
    return [json.loads((run / f"rank{r}.json").read_text()) for r in range(n)]


def _start(script: str, fake: dict, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        ["bash", str(SLURM_DIR / script), str(fake["cfg"]), *overrides],
        env=fake["env"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _check_common(fake: dict, ranks: list[dict]) -> None:
    for r, rec in enumerate(ranks):
        assert (rec["rank"], rec["world_size"], rec["total"]) == (r, 2, 3.0)
        assert rec["local_rank"] == r
        assert rec["config"] == str(fake["cfg"])
        assert rec["sets"]["output_dir"] == str(fake["run"])
        assert rec["sets"]["checkpoint.resume"] == "auto"
        assert rec["sets"]["probe.tag"] == "a b"  # an override with a space survives quoting


def _preempt(fake: dict, script: str) -> tuple[list[dict], list[str], str]:
    """Starts ``script``, waits for both ranks, sends USR1 to the batch shell, waits for the end."""
    proc = _start(script, fake, "probe.wait=1", "probe.tag=a b")
    _wait_for([fake["run"] / f"ready{r}" for r in range(2)], proc, 90)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    got = [(fake["run"] / f"signal{r}").read_text() for r in range(2)]
    return _ranks(fake["run"]), got, out


@pytest.mark.slow
def test_srun_per_task_mode_and_preemption(fake_slurm):
    ranks, got, out = _preempt(fake_slurm, "train_srun.sbatch")
    _check_common(fake_slurm, ranks)
    for r, rec in enumerate(ranks):
        # The bootstrap read srun's variables; the batch script set the master.
        assert rec["env"]["SLURM_PROCID"] == str(r) and rec["env"]["SLURM_NTASKS"] == "2"
        assert rec["env"]["MASTER_ADDR"] == "localhost"
        assert rec["env"]["MASTER_PORT"] == fake_slurm["env"]["MASTER_PORT"]
        assert rec["env"]["OMP_NUM_THREADS"] == "4"  # the task's CPUs, one process per task
    assert got == [str(int(signal.SIGUSR1))] * 2  # srun passed USR1 to every task
    calls = fake_slurm["log"].read_text().splitlines()
    assert calls[0] == "scontrol show hostnames localhost"  # scontrol found the master
    assert calls[1].startswith("srun ntasks=2 ")
    assert calls[-1] == f"scontrol requeue {fake_slurm['job']}"


@pytest.mark.slow
def test_one_node_torchrun_mode_and_preemption(fake_slurm):
    ranks, got, out = _preempt(fake_slurm, "train_1node.sbatch")
    _check_common(fake_slurm, ranks)
    for rec in ranks:
        assert rec["env"]["SLURM_PROCID"] is None  # torchrun, not srun, started the workers
        assert rec["env"]["OMP_NUM_THREADS"] == "2"  # 4 CPUs shared by 2 processes
    assert got == [str(int(signal.SIGTERM))] * 2  # torchrun passed the shell's TERM on
    calls = fake_slurm["log"].read_text().splitlines()
    assert calls == [f"scontrol requeue {fake_slurm['job']}"]  # no srun in this mode


@pytest.mark.slow
def test_multinode_torchrun_mode_and_preemption(fake_slurm):
    ranks, got, out = _preempt(fake_slurm, "train_multinode.sbatch")
    _check_common(fake_slurm, ranks)
    for rec in ranks:
        assert rec["env"]["TORCHELASTIC_RUN_ID"] == fake_slurm["job"]  # --rdzv_id=$SLURM_JOB_ID
        assert rec["env"]["GROUP_RANK"] == "0"
        assert rec["env"]["OMP_NUM_THREADS"] == "2"
    # srun got USR1, relay.sh turned it into TERM for torchrun, torchrun into TERM for workers.
    assert got == [str(int(signal.SIGTERM))] * 2
    calls = fake_slurm["log"].read_text().splitlines()
    srun = next(c for c in calls if c.startswith("srun "))
    port = fake_slurm["env"]["MASTER_PORT"]
    assert srun.startswith("srun ntasks=1 ")
    for part in (
        "relay.sh",
        "--nnodes=1",
        "--nproc_per_node=2",
        "--rdzv_backend=c10d",
        f"--rdzv_endpoint=localhost:{port}",
        f"--rdzv_id={fake_slurm['job']}",
        "--max-restarts=3",
    ):
        assert part in srun
    assert calls[-1] == f"scontrol requeue {fake_slurm['job']}"


@pytest.mark.slow
def test_multinode_runs_to_completion_without_requeue(fake_slurm):
    fake_slurm["env"]["MAX_RESTARTS"] = "1"
    proc = _start("train_multinode.sbatch", fake_slurm, "probe.tag=a b")
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    _check_common(fake_slurm, _ranks(fake_slurm["run"]))
    calls = fake_slurm["log"].read_text().splitlines()
    assert not any("requeue" in c for c in calls)
    assert "--max-restarts=1" in calls[-1]
    assert "training exited with status 0" in out


# --- the real trainer ----------------------------------------------------------------------------
@pytest.mark.slow
def test_real_trainer_through_one_node_script_preempted_and_resumed(fake_slurm, tmp_path):
    """The one-node script runs launch/train.py on synthetic data; USR1 to the batch shell makes
    it checkpoint and requeue; starting the script again resumes and completes the run."""
    data = tmp_path / "data"
    made = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "make_synthetic.py"),
            "--out",
            str(data),
            "--identities",
            "16",
            "--images-per-identity",
            "8",
            "--val-identities",
            "4",
            "--val-pairs",
            "20",
            "--quiet",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        textwrap.dedent(f"""\
        seed: 0
        max_steps: 400
        log_every_steps: 1
        data: {{root: {data}, batch_size: 8, num_workers: 0, image_size: 112}}
        backbone: {{name: mobilefacenet, embedding_size: 64}}
        head: {{name: arcface}}
        eval: {{targets: []}}
        checkpoint: {{every_steps: 1000, at_epoch_end: false, keep_last: 2}}
    """)
    )
    fake_slurm["cfg"] = cfg
    env = fake_slurm["env"]
    del env["TRAIN_SCRIPT"]
    # A step can take many seconds on a loaded CPU machine: leave time to finish it and save.
    env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] = "180"
    proc = _start("train_1node.sbatch", fake_slurm)
    log = fake_slurm["run"] / "train.log"
    deadline = time.time() + 240
    while not (log.exists() and "step 3/" in log.read_text()):
        assert proc.poll() is None, proc.stdout.read()
        assert time.time() < deadline, "no training step logged"
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out
    ckpts = sorted((fake_slurm["run"] / "checkpoints").glob("step_????????.pt"))
    assert ckpts, out
    assert fake_slurm["log"].read_text().splitlines()[-1] == f"scontrol requeue {fake_slurm['job']}"
    stopped_at = int(ckpts[-1].stem.split("_")[1])
    assert 3 <= stopped_at < 400
    # The "requeued" job: same job, same name, same run directory; finishes from the checkpoint.
    env["SLURM_RESTART_COUNT"] = "1"
    proc = _start("train_1node.sbatch", fake_slurm, f"max_steps={stopped_at + 2}")
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    text = log.read_text()
    assert f"resumed from {ckpts[-1]}" in text
    assert (fake_slurm["run"] / "model.pt").exists()
