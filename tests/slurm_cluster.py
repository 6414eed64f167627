"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd on this machine.

Owns: writing a minimal ``slurm.conf`` (one node with this machine's CPUs and memory as
``slurmd -C`` reports them, one partition, ``JobRequeue=1``, ``proctrack/linuxproc``,
``task/none``, every file under one temporary directory), a fresh munge key, starting the three
daemons, waiting (bounded) until the node is idle, running the client commands against this
cluster (``SLURM_CONF``), and stopping everything it started (``SLURM_TEST_KEEP_LOGS=DIR`` keeps
the daemons' logs there). Nothing outside its temporary
directory is touched; the ports are free ones, so two clusters on one machine do not meet.

Debian's packages (``slurmctld slurmd slurm-client munge``) provide the binaries; ``.ci/run``
installs them when ``sbatch`` is missing. The daemons run as the calling user and need root
(slurmd starts job steps as the job's user).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel")
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")


class SlurmUnavailable(RuntimeError):
    """The cluster cannot run here; the message says why (the tests skip with it)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next(
        (f"{d}/{name}" for d in SBIN if os.access(f"{d}/{name}", os.X_OK)), None
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_binaries() -> list[str]:
    """The Slurm/munge programs that are not installed."""
    return [b for b in BINARIES if _which(b) is None]


@dataclass
class SlurmCluster:
    """One running cluster; :meth:`start` brings it up, :meth:`stop` takes it down."""

    root: Path
    """Temporary directory holding the configuration, key, state, spool and logs."""
    node: str = field(default_factory=lambda: socket.gethostname().split(".")[0])
    """The node's name: this machine's host name, so a node name resolves like a real one."""
    kill_wait_s: int = 60
    """Seconds between Slurm's SIGTERM and SIGKILL of a cancelled/requeued job (``KillWait``)."""
    cred_expire_s: int = 10
    """Job credential lifetime (``AuthInfo=cred_expire``; Slurm's default is 120 s): a requeued
    job starts again only after it (an earlier start fails with "Job credential revoked")."""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands (and jobs submitted with it)."""
        return os.environ | {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """Runs a Slurm client command against this cluster; returns its stdout."""
        res = subprocess.run(
            [_which(args[0]) or args[0], *args[1:]],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    # --- setup -----------------------------------------------------------------------------
    def _write_config(self) -> None:
        r = self.root
        for d in ("state", "spool", "munge", "log"):
            (r / d).mkdir(mode=0o700)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        hw = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30)
        line = hw.stdout.splitlines()[0] if hw.returncode == 0 and hw.stdout else ""
        m = re.search(r"CPUs=(\d+)", line)
        mem = re.search(r"RealMemory=(\d+)", line)
        if not m or not mem:
            raise SlurmUnavailable(f"'slurmd -C' did not describe this machine: {hw.stderr!r}")
        # The node as slurmd sees it (sockets, cores, threads), under this cluster's node name.
        hw_desc = re.sub(r"^NodeName=\S+\s*", "", line.strip())
        hw_desc = re.sub(r"\s*UpTime=\S+", "", hw_desc)
        host = socket.gethostname()
        self.conf.write_text(
            f"""\
ClusterName=testcluster
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={r}/munge/munge.socket,cred_expire={self.cred_expire_s}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
KillWait={self.kill_wait_s}
MinJobAge=600
ReturnToService=2
InactiveLimit=0
SlurmdTimeout=300
NodeName={self.node} NodeHostname={host} NodeAddr=127.0.0.1 {hw_desc} State=UNKNOWN
PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")  # noqa: SIM115 (kept open)
        self.procs[name] = subprocess.Popen(
            argv,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a test's signals to its own group never reach them
        )

    def _daemon_log(self, name: str) -> str:
        texts = []
        for f in (self.root / "log").glob(f"{name}*"):
            with contextlib.suppress(OSError):
                texts.append(f.read_text()[-1500:])
        return "\n".join(texts).strip()

    def _alive_or_raise(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                raise SlurmUnavailable(
                    f"{name} exited with status {p.returncode} at start: {self._daemon_log(name)}"
                )

    def start(self, timeout_s: float = 60) -> SlurmCluster:
        """Starts munged, slurmctld and slurmd; returns when the node is idle (else raises)."""
        missing = missing_binaries()
        if missing:
            raise SlurmUnavailable(f"not installed: {', '.join(missing)}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to start jobs (not root here)")
        self._write_config()
        r = self.root
        self._spawn(
            "munged",
            [
                _which("munged"),
                "-F",
                "--force",
                f"--socket={r}/munge/munge.socket",
                f"--key-file={r}/munge/munge.key",
                f"--pid-file={r}/munge/munged.pid",
                f"--seed-file={r}/munge/munged.seed",
                f"--log-file={r}/log/munged.log",
            ],
        )
        deadline = time.monotonic() + timeout_s
        while not (r / "munge" / "munge.socket").exists():
            self._alive_or_raise()
            if time.monotonic() > deadline:
                raise SlurmUnavailable("munged did not create its socket")
            time.sleep(0.1)
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.node])
        state = ""
        while True:
            self._alive_or_raise()
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                state = self.run("sinfo", "-h", "-n", self.node, "-o", "%T", timeout=10).strip()
                if state == "idle":
                    return self
            if time.monotonic() > deadline:
                raise SlurmUnavailable(
                    f"node {self.node} not idle after {timeout_s:.0f} s (state '{state}'): "
                    f"{self._daemon_log('slurmd')}"
                )
            time.sleep(0.3)

    # --- jobs --------------------------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a dict (empty when Slurm no longer knows the job)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False)
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_state(self, job_id: str, states: set[str], timeout_s: float) -> dict[str, str]:
        """Waits until the job's state is one of ``states``; returns its record."""
        deadline = time.monotonic() + timeout_s
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not in {states} after {timeout_s} s: {info}")

    # --- teardown ------------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancels this cluster's jobs, waits (bounded) for them to go, stops the daemons."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--full", "--signal=KILL", "--user", str(os.getuid()))
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    left = self.run("squeue", "-h", "-t", "R,CG,S", "-o", "%i").split()
                    if not left:
                        break
                    time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        keep = os.environ.get("SLURM_TEST_KEEP_LOGS")
        if keep:  # the daemons' logs, for a failure's diagnosis
            shutil.copytree(self.root / "log", Path(keep) / self.root.name, dirs_exist_ok=True)
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(timeout_s: float = 60) -> SlurmCluster:
    """A started cluster in a fresh temporary directory; :class:`SlurmUnavailable` if it cannot
    run here (the directory is removed then)."""
    cluster = SlurmCluster(Path(tempfile.mkdtemp(prefix="slurm-test-")))
    try:
        return cluster.start(timeout_s)
    except BaseException:
        cluster.stop()
        raise
